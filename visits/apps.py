from django.apps import AppConfig
from django.db.models.signals import post_migrate


class VisitsConfig(AppConfig):
    name = "visits"
    verbose_name = "Visits"

    def ready(self) -> None:
        import config.session_policy  # noqa: F401  (its sign-in receiver starts the clock)
        import visits.audit  # noqa: F401  (its receivers record signing in and out)
        from pipeline.workflow import workflow_register
        from visits.delivery import NOTE_DELIVERY_WORKFLOW
        from visits.retention import purge_schedule_ensure
        from visits.stages import VISIT_WORKFLOW

        workflow_register(VISIT_WORKFLOW)
        workflow_register(NOTE_DELIVERY_WORKFLOW)
        post_migrate.connect(purge_schedule_ensure, sender=self)
