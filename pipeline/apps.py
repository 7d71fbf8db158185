from django.apps import AppConfig
from django.db.models.signals import post_migrate


class PipelineConfig(AppConfig):
    name = "pipeline"
    verbose_name = "Pipeline engine"

    def ready(self) -> None:
        from pipeline import checks  # noqa: F401  (registers the system checks)
        from pipeline.schedule import sweep_schedule_ensure
        from pipeline.tracing import tracing_setup

        post_migrate.connect(sweep_schedule_ensure, sender=self)
        tracing_setup()  # when OTEL_EXPORTER_OTLP_ENDPOINT is set; see there about forks
