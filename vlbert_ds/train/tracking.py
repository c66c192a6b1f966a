"""MLflow tracking from rank 0: params, per-step metrics, the resolved config, the DeepSpeed JSON, a loss plot.

The tracking URI comes from `tracking.uri`, else `MLFLOW_TRACKING_URI`, else a local sqlite store
under the output folder (so the default job needs no server). A resumed job re-attaches to the run
id stored in its checkpoint. Metrics are buffered and written when a checkpoint is committed (and at
the end): after a crash the steps since the last checkpoint are recomputed identically, and MLflow
never receives the same step twice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# Run tag: the last step whose metrics the run holds (sent atomically with them).
SENT_TAG = "vlbert_ds.metrics_sent_through"

# Never logged as params, whatever a config holds.
_SECRET_HINTS = ("secret", "password", "token", "access_key", "credential")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if any(h in k.lower() for h in _SECRET_HINTS) else v) for k, v in params.items()}


def resolve_uri(configured: str, output_dir: str) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """A no-op unless this is rank 0 and tracking is enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self.uri: str | None = None
        self.experiment_id: str | None = None
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._client = None
        self.finished = False

    def start(self, uri: str, experiment: str, run_name: str, run_id: str | None, output_dir: str) -> None:
        if not self.enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            artifact_location = None
            if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
                artifact_location = (Path(output_dir).resolve() / "mlartifacts").as_uri()
            self.experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            self.experiment_id = found.experiment_id
        if run_id:
            self.run_id = client.get_run(run_id).info.run_id  # raises if the run does not exist
            client.set_terminated(self.run_id, status="RUNNING")
        else:
            self.run_id = client.create_run(self.experiment_id, run_name=run_name or None).info.run_id
        self._client = client

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in redact(params).items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self._client.log_batch(self.run_id, params=fresh[start : start + 100])

    def queue_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            self._pending.append((step, metrics))

    def flush(self) -> None:
        """Write the buffered metrics (called when a checkpoint is committed, and at the end)."""
        if not self.enabled or not self._pending:
            return
        self._send(self._pending)
        self._pending.clear()

    def _send(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """log_batch requests of at most 1000 values, cut between steps; each carries the tag saying through
        which step the run has its metrics, in the same request, so the tag never runs ahead or behind."""
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        chunk: list[Metric] = []
        for index, (step, values) in enumerate(rows):
            chunk += [Metric(k, float(v), now, step) for k, v in values.items()]
            last = index == len(rows) - 1
            if last or len(chunk) + len(rows[index + 1][1]) > 1000:
                self._client.log_batch(self.run_id, metrics=chunk, tags=[RunTag(SENT_TAG, str(step))])
                chunk = []

    def sent_through(self) -> int | None:
        """The last step whose metrics the run has (None for a run that never had the tag)."""
        value = self._client.get_run(self.run_id).data.tags.get(SENT_TAG)
        return int(value) if value is not None else None

    def log_missing(self, rows: list[tuple[int, dict[str, float]]]) -> int:
        """Send the (step, metrics) rows the run does not have yet; returns how many values were sent.
        A resumed run calls it with the committed rows of `metrics.jsonl`."""
        if not self.enabled or not rows or self.run_id is None:
            return 0
        through = self.sent_through()
        if through is not None:
            missing = [(step, values) for step, values in rows if step > through]
        else:  # a run from before the tag: compare per metric (one history request per key)
            have = {key: {m.step for m in self._client.get_metric_history(self.run_id, key)}
                    for key in {k for _, values in rows for k in values}}
            missing = [(step, kept) for step, values in rows
                       if (kept := {k: v for k, v in values.items() if step not in have[k]})]
        if missing:
            self._send(missing)
            count = sum(len(values) for _, values in missing)
            log.warning("MLflow run %s lacked the metrics of %d committed steps (%d values; a kill before they "
                        "were sent): sent them from metrics.jsonl", self.run_id, len(missing), count)
            return count
        return 0

    def drop_pending(self) -> None:
        self._pending.clear()

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self._client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.flush()
            self._client.set_terminated(self.run_id, status=status)
            self.finished = True

    def fail(self, error: BaseException) -> None:
        """Mark a started, unfinished run FAILED (KILLED on Ctrl-C) with the error as a tag; never raises,
        so the original error is what the user sees. Buffered metrics are not written: the steps since the
        last checkpoint are recomputed by a resumed run."""
        if not (self.enabled and self.run_id and self._client is not None) or self.finished:
            return
        try:
            self._client.set_tag(self.run_id, "vlbert_ds.error", f"{type(error).__name__}: {error}"[:5000])
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            self._client.set_terminated(self.run_id, status=status)
            self.finished = True
        except Exception as err:  # the tracking server may be what failed
            log.warning("could not mark MLflow run %s failed: %s", self.run_id, err)
