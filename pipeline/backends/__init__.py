"""Who schedules the stages: django-q2 (`djangoq`) or Temporal (`temporal/`). Each implements
`pipeline.core.dispatch.Backend`; the database stays the record whichever one runs."""
