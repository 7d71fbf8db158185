from typing import Any

from django import forms
from django.conf import settings
from django.template.defaultfilters import filesizeformat

from visits.errors import RecordingRejected
from visits.services import RECORDING_EXTENSIONS, recording_validate


class VisitUploadForm(forms.Form):
    label = forms.CharField(
        max_length=200,
        required=False,
        help_text="Optional, for your own reference. Avoid patient names.",
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
