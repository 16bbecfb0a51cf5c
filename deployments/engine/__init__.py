"""The inference engine: model runner, scheduler, sampling and the per-request text pipeline."""
