from typing import Any

from django import forms
from django.conf import settings
from django.http import QueryDict
from django.template.defaultfilters import filesizeformat

from visits.errors import RecordingRejected
from visits.notes.versions import ItemEdit
from visits.privacy.consent import ATTESTED_METHODS, ConsentGiven
from visits.schemas import ChartNote
from visits.services import RECORDING_EXTENSIONS, recording_validate, visit_ref_validate

_REF_HELP = "Optional: the EHR's identifier (an MRN or FHIR id), never a name."


class ConsentForm(forms.Form):
    """The patient's consent to recording, attested by the clinician before any capture; not
    asked where the practice collects it elsewhere (CONSENT_COLLECTED_ELSEWHERE)."""

    consent_method = forms.ChoiceField(
        label="Patient's consent to recording",
        choices=[(method.value, method.label) for method in ATTESTED_METHODS],
        widget=forms.RadioSelect,
        error_messages={
            "required": "Record the patient's consent first: nothing is recorded or processed "
            "without it."
        },
    )
    others_present = forms.CharField(
        label="Also present",
        max_length=200,
        required=False,
        help_text="Optional: who else is in the room, by role (parent, interpreter); no names.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if settings.CONSENT_COLLECTED_ELSEWHERE:
            del self.fields["consent_method"]
            del self.fields["others_present"]

    def consent(self, clinician: Any) -> ConsentGiven | None:
        """The consent given (None where it is collected elsewhere); after `is_valid`."""
        if "consent_method" not in self.cleaned_data:
            return None
        return ConsentGiven(
            method=self.cleaned_data["consent_method"],
            attested_by=clinician,
            others_present=self.cleaned_data["others_present"],
        )


class VisitUploadForm(ConsentForm):
    label = forms.CharField(
        max_length=200,
        required=False,
        help_text="Optional, for your own reference. Avoid patient names.",
    )
    patient_ref = forms.CharField(
        label="Patient reference", max_length=64, required=False, help_text=_REF_HELP
    )
    encounter_ref = forms.CharField(
        label="Encounter reference", max_length=64, required=False, help_text=_REF_HELP
    )
    recording = forms.FileField(
        help_text="WAV, MP3, M4A, OGG, FLAC or WebM.",
        widget=forms.ClearableFileInput(attrs={"accept": ",".join(sorted(RECORDING_EXTENSIONS))}),
    )

    def __init__(self, *args: Any, too_large: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.too_large = too_large
        if too_large:
            # The upload was stopped part-way: the file is absent because it was too big, not
            # because none was chosen, so say only the first.
            self.fields["recording"].required = False

    def clean_patient_ref(self) -> str:
        return _ref(self.cleaned_data["patient_ref"], what="patient reference")

    def clean_encounter_ref(self) -> str:
        return _ref(self.cleaned_data["encounter_ref"], what="encounter reference")

    def clean_recording(self) -> object:
        recording = self.cleaned_data["recording"]
        if recording is None:
            return recording
        try:
            recording_validate(name=recording.name or "", size=recording.size or 0)
        except RecordingRejected as exc:
            raise forms.ValidationError(str(exc)) from exc
        return recording

    def clean(self) -> dict[str, Any] | None:
        if self.too_large:
            limit = filesizeformat(settings.RECORDING_MAX_BYTES)
            self.add_error(
                "recording",
                f"The file is larger than the {limit} limit. Split the recording and upload "
                "the parts as separate visits.",
            )
        return super().clean()


def _ref(value: str, *, what: str) -> str:
    try:
        return visit_ref_validate(value, what=what)
    except RecordingRejected as exc:
        raise forms.ValidationError(str(exc)) from exc


class VisitRefsForm(forms.Form):
    """The clinician corrects a visit's EHR references before signing."""

    patient_ref = forms.CharField(
        label="Patient reference", max_length=64, required=False, help_text=_REF_HELP
    )
    encounter_ref = forms.CharField(
        label="Encounter reference", max_length=64, required=False, help_text=_REF_HELP
    )


def note_edits_from_post(post: QueryDict, note: ChartNote) -> dict[str, list[ItemEdit]]:
    """The clinician's edit of `note` from the edit form: per part, field `<part>-<i>` holds
    line i's text (emptied or ticked `<part>-<i>-remove` to remove it) and `<part>-new` the
    lines they added, one per line; a ticked `<part>-<i>-confirm` confirms an unsupported
    line. A line whose field is missing is kept as it was."""
    edits: dict[str, list[ItemEdit]] = {}
    for key, _, items in note.parts():
        kept = [
            ItemEdit(
                index=i,
                text="" if post.get(f"{key}-{i}-remove") else post.get(f"{key}-{i}", item.text),
                confirmed=bool(post.get(f"{key}-{i}-confirm")),
            )
            for i, item in enumerate(items)
        ]
        added = [
            ItemEdit(index=None, text=line) for line in post.get(f"{key}-new", "").splitlines()
        ]
        edits[key] = kept + added
    return edits
