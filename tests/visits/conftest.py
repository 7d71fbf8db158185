import pytest

from tests.conftest import SHORT_VISIT
from visits.models import Visit
from visits.services import visit_create, visit_start


@pytest.fixture
def finished_visit(clinician) -> Visit:
    """The short visit, its pipeline run to the end inline with the offline engine: version 1
    of its note is the model's draft. (Inline runs need `django_db(transaction=True)`.)"""
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    return visit
