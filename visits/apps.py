from django.apps import AppConfig


class VisitsConfig(AppConfig):
    name = "visits"
    verbose_name = "Visits"

    def ready(self) -> None:
        import config.session_policy  # noqa: F401  (its sign-in receiver starts the clock)
        import visits.audit  # noqa: F401  (its receivers record signing in and out)
        from pipeline.workflow import workflow_register
        from visits.delivery import NOTE_DELIVERY_WORKFLOW
        from visits.stages import VISIT_WORKFLOW

        workflow_register(VISIT_WORKFLOW)
        workflow_register(NOTE_DELIVERY_WORKFLOW)
