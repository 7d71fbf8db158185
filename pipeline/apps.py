from django.apps import AppConfig
from django.db.models.signals import post_migrate


class PipelineConfig(AppConfig):
    name = "pipeline"
    verbose_name = "Pipeline engine"

    def ready(self) -> None:
        # Imported for what they register: the system checks and the admin's pages (the
        # admin lives in `pipeline.ops`, where Django's autodiscovery does not look).
        from pipeline.backends.djangoq import sweep_schedule_ensure
        from pipeline.core.tracing import tracing_setup
        from pipeline.ops import admin, checks  # noqa: F401

        post_migrate.connect(sweep_schedule_ensure, sender=self)
        tracing_setup()  # when OTEL_EXPORTER_OTLP_ENDPOINT is set; see there about forks
