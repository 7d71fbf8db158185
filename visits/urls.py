from django.urls import path

from visits import views

app_name = "visits"

urlpatterns = [
    path("", views.visit_list, name="list"),
    path("visits/rows/", views.visit_list_rows, name="list_rows"),
    path("visits/new/", views.visit_upload, name="upload"),
    path(
        "recordings/<uuid:session_id>/pieces/<int:index>/",
        views.recording_piece,
        name="recording_piece",
    ),
    path("recordings/<uuid:session_id>/start/", views.recording_start, name="recording_start"),
    path("recordings/<uuid:session_id>/finish/", views.recording_finish, name="recording_finish"),
    path("visits/<int:visit_id>/", views.visit_detail, name="detail"),
    path("visits/<int:visit_id>/live/", views.visit_live, name="live"),
    path("visits/<int:visit_id>/recording/", views.visit_recording, name="recording"),
    path(
        "visits/<int:visit_id>/recording/finish/",
        views.visit_recording_finish,
        name="recording_finish_arrived",
    ),
    path(
        "visits/<int:visit_id>/transcript/live/",
        views.visit_live_transcript,
        name="live_transcript",
    ),
    path("visits/<int:visit_id>/consent/withdraw/", views.consent_withdraw_view, name="withdraw"),
    path("visits/<int:visit_id>/sign/", views.note_sign_view, name="sign"),
    path("visits/<int:visit_id>/note/edit/", views.note_edit, name="note_edit"),
    path(
        "visits/<int:visit_id>/note/<int:number>/",
        views.note_version_detail,
        name="note_version",
    ),
    path("visits/<int:visit_id>/history/", views.visit_timeline, name="history"),
    path("visits/<int:visit_id>/refs/", views.visit_refs, name="refs"),
    path("visits/<int:visit_id>/fhir/", views.visit_fhir, name="fhir"),
    path(
        "visits/<int:visit_id>/after-visit-summary/",
        views.visit_after_visit_summary,
        name="after_visit_summary",
    ),
]
