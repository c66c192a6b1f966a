"""The suite must fit a CI disk: pytest keeps every tmp_path by default, and ours hold checkpoints."""

from __future__ import annotations


def test_a_passed_tests_temp_folder_is_removed_when_it_ends(request):
    # Without this setting the suite kept ~12 GB after its first 72 tests and a CI run hit ENOSPC.
    assert request.config.getini("tmp_path_retention_policy") == "failed"
