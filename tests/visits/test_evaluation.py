"""`manage.py evaluate` and `visits.quality.evaluation`: the normalizer, the scores on hand-made
documents, the report's overall figures, the set's validation, and one real run."""

from __future__ import annotations

import json
import shutil
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from tests.conftest import SHORT_VISIT
from visits.models import Visit
from visits.quality.evaluation import (
    EvaluationCase,
    EvaluationRefused,
    EvaluationReport,
    RecordingScore,
    evaluation_set_load,
    key_terms_found,
    recording_score,
    report_markdown,
    report_table,
    text_normalize,
    word_error_rate,
    wrong_numbers,
)
from visits.schemas import (
    ClinicalSummary,
    Doubt,
    Finding,
    Medication,
    NoteOutput,
    PostVisitNote,
    Segment,
    SOAPNote,
    SummarizeOutput,
    Transcript,
    Vital,
)
from visits.speech.vocabulary import vocabulary_prompt

# --- the normalizer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("Hello, World!", "hello world"),
        ("  several   spaces\n and\ttabs ", "several spaces and tabs"),
        ("", ""),
        ("...?!", ""),
        # numbers as people say them and as Whisper writes them agree
        ("one forty two over ninety", "142 over 90"),
        ("One hundred and forty-two over ninety.", "142 over 90"),
        ("100 and 42 over 90", "142 over 90"),
        ("142/90", "142 over 90"),
        ("Blood pressure: 150 over 95.", "blood pressure 150 over 95"),
        ("Take ten milligrams twice a day.", "take 10 milligrams twice a day"),
        ("twenty-five milligrams", "25 milligrams"),
        ("ninety eight point six", "98.6"),
        ("Temperature 98.6 degrees.", "temperature 98.6 degrees"),
        ("one thousand units", "1000 units"),
        ("1,000 units", "1000 units"),
        ("five percent", "5 percent"),
        ("5%", "5 percent"),
        ("the third visit", "the 3rd visit"),
        # punctuation: apostrophes join, everything else separates
        ("It's a follow-up.", "its a follow up"),
        ("don\u2019t", "dont"),
        ("Dr. Smith's B12, O.K.?", "dr smiths b12 o k"),
        ("end. 3. Then", "end 3 then"),
        ("Naïve café", "naïve café"),
    ],
)
def test_text_normalize(text, normalized):
    assert text_normalize(text) == normalized


# --- scoring, on hand-made transcripts and documents ---------------------------------------

SCRIPT = "Your blood pressure is one forty two over ninety. Follow up in two weeks."


def test_word_error_rate_is_zero_for_texts_equal_once_normalized():
    assert word_error_rate(SCRIPT, "your blood pressure is 142/90 -- follow-up in 2 weeks") == 0.0


def test_word_error_rate_counts_words_after_normalization():
    # 12 reference words ("142 over 90" is three); "92" for "90" and "week" for "weeks"
    assert len(text_normalize(SCRIPT).split()) == 12
    assert word_error_rate(
        SCRIPT, "Your blood pressure is 142 over 92. Follow up in two week."
    ) == pytest.approx(2 / 12)
    assert word_error_rate("back pain", "") == 1.0


def test_key_terms_are_found_as_whole_words_and_phrases_after_normalization():
    transcript = (
        "Your ECG is fine; the heart rate too. Follow up in 2 weeks. One fifty over ninety "
        "five. Next year, hearing test."
    )
    terms = ["ECG", "Heart rate", "follow-up", "two weeks", "150 over 95", "ear", "rate too"]
    assert key_terms_found(terms, transcript) == [
        "ECG",
        "Heart rate",
        "follow-up",
        "two weeks",
        "150 over 95",
        "rate too",
    ]
    # "ear" is inside "year" and "hearing", never said; "week" is not "weeks"
    assert key_terms_found(["ear", "week", "ninety five"], transcript) == ["ninety five"]


def test_wrong_numbers_are_the_note_numbers_the_script_never_says():
    # "42/90" where "one forty two over ninety" was said: 42 is wrong, 90 is not.
    assert wrong_numbers(["BP 42/90", "Follow up in two weeks."], SCRIPT) == (["42"], [])
    assert wrong_numbers(["BP 142 over 90", "Return in 2 weeks"], SCRIPT) == ([], [])
    # each once, in the order the note states them; "5.0" is the number 5
    note = ["Take 7 mg", "then 7 mg and 3 mg", "BP 142/90", "5.0 kg"]
    assert wrong_numbers(note, SCRIPT + " Five kilograms.") == (["7", "3"], [])


def test_a_misheard_number_quoted_as_heard_is_counted_apart_from_what_the_note_states():
    note = [
        "A medication was mentioned, name not recognised: “me look sick 15 milligrams one Sunday”",
        "Weight (as said): “your weight is up 4 pounds” and 9 kg",
    ]
    stated, quoted = wrong_numbers(note, "Take meloxicam 15 milligrams once a day. Up 4 pounds.")
    assert stated == ["9"]  # outside the quotes: the note states it
    assert quoted == ["1"]  # "one Sunday" as heard; 15 and 4 were said


def _segments(*texts: str) -> Transcript:
    return Transcript(
        model="tiny.en (bundled)",
        duration_seconds=10.0,
        segments=[
            Segment(id=i, start=float(i), end=i + 1.0, text=text) for i, text in enumerate(texts)
        ],
    )


def _case(**overrides) -> EvaluationCase:
    data = {
        "slug": "bp",
        "specialty": "primary care",
        "title": "Blood pressure",
        "lines": [
            {"speaker": "Doctor", "text": "Your blood pressure is one forty two over ninety."},
            {"speaker": "Doctor", "text": "Keep taking ibuprofen. Follow up in two weeks."},
        ],
        "key_terms": ["blood pressure", "ibuprofen", "follow-up", "lisinopril"],
        "facts": [{"kind": "vital", "name": "blood pressure", "value": "142/90", "extra": 1}],
        "changes": [],
        "voices": {"Doctor": "en-gb"},  # what the set's generator adds is ignored
    }
    return EvaluationCase.model_validate(data | overrides)


def _score_of_hand_made_documents() -> RecordingScore:
    transcript = _segments(
        "Your blood pressure is 142/90.", "Keep taking ibuprofen.", "Follow-up in two weeks."
    )
    summary = ClinicalSummary(
        chief_complaint=Finding(text="blood pressure check", segment_ids=[0]),
        history=[],
        medications=[
            Medication(name="ibuprofen", dose=None, frequency=None, segment_ids=[1]),
            Medication(name="zorblax", dose=None, frequency=None, segment_ids=[1]),
        ],
        allergies=[],
        vitals=[Vital(name="blood pressure", value="42/90", segment_ids=[0])],
        assessment=[],
        plan=[],
    )
    summarized = SummarizeOutput(
        engine="test",
        summary=summary,
        unsupported=[
            Doubt(where="vitals[0]", text="blood pressure: 42/90", why="42 is not said"),
            Doubt(where="medications[1]", text="zorblax", why="?", kind="unknown_drug"),
        ],
    )
    note = PostVisitNote(
        soap=SOAPNote(
            subjective=[Finding(text="Here for a blood pressure check.", segment_ids=[0])],
            objective=[Finding(text="BP 42/90", segment_ids=[0])],
            assessment=[],
            plan=[Finding(text="Follow up in two weeks.", segment_ids=[2, 7])],
        ),
        patient_summary=[Finding(text="Keep taking ibuprofen.", segment_ids=[1])],
    )
    noted = NoteOutput(
        engine="test",
        note=note,
        unsupported=[Doubt(where="soap.objective[0]", text="BP 42/90", why="42 is not said")],
    )
    return recording_score(
        _case(),
        recording="bp.ogg",
        visit=1,
        status="succeeded",
        wall_seconds=3.0,
        audio_seconds=30.0,
        transcript=transcript,
        summarized=summarized,
        noted=noted,
    )


def test_recording_score_of_hand_made_documents():
    score = _score_of_hand_made_documents()

    assert score.wer == 0.0
    assert score.reference == score.hypothesis
    assert (score.key_terms, score.key_terms_found, score.missed_terms) == (4, 3, ["lisinopril"])
    assert score.key_term_recall == 0.75
    # summary: complaint ok, ibuprofen ok, zorblax ok (an unknown name is not an evidence
    # problem), vitals[0] flagged; note: subjective ok, objective flagged, plan cites a
    # segment 7 that does not exist, patient summary ok
    assert (score.items, score.items_with_valid_evidence) == (8, 5)
    assert score.valid_evidence_share == 5 / 8
    assert (score.unsupported, score.unknown_drugs) == (2, 1)
    assert score.wrong_numbers == ["42"]
    assert score.seconds_per_audio_minute == 6.0
    assert score.engine == "test" and score.transcription_model == "tiny.en (bundled)"


def test_a_recording_without_transcript_scores_every_word_missed():
    score = recording_score(
        _case(),
        recording="bp.ogg",
        visit=1,
        status="failed",
        error="ingest: unreadable",
        wall_seconds=0.1,
        audio_seconds=None,
        transcript=None,
        summarized=None,
        noted=None,
    )
    assert score.wer == 1.0 and score.hypothesis == ""
    assert score.key_term_recall == 0.0
    assert score.items == 0 and score.valid_evidence_share is None
    assert score.wrong_numbers == [] and score.seconds_per_audio_minute is None


def _plain_score(slug: str, reference: str, hypothesis: str, **fields) -> RecordingScore:
    return recording_score(
        _case(slug=slug, lines=[{"speaker": "Doctor", "text": reference}], **fields),
        recording=f"{slug}.ogg",
        visit=1,
        status="succeeded",
        wall_seconds=6.0,
        audio_seconds=60.0,
        transcript=_segments(hypothesis),
        summarized=None,
        noted=None,
    )


def test_overall_wer_is_over_all_words_together_not_an_average():
    short = _plain_score("short", "hello", "goodbye", key_terms=["hello"])
    long = _plain_score(
        "long",
        "one two three four five six seven eight nine",
        "one two three four five six seven eight nine",
        key_terms=["one", "five", "nine"],
    )
    assert (short.wer, long.wer) == (1.0, 0.0)

    report = EvaluationReport.from_scores([short, long], evaluation_set="set")

    overall = report.overall
    assert overall.wer == pytest.approx(1 / 10)  # the average would be 0.5
    assert overall.reference_words == 10
    assert (overall.key_terms, overall.key_terms_found, overall.key_term_recall) == (4, 3, 0.75)
    assert overall.seconds_per_audio_minute == 6.0
    assert (overall.recordings, overall.succeeded) == (2, 2)


def test_report_renders_as_a_table_and_as_markdown():
    report = EvaluationReport.from_scores(
        [_score_of_hand_made_documents(), _plain_score("plain", "hello there", "hello")],
        evaluation_set="set",
    )

    lines = report_table(report)
    assert lines[0].split()[:3] == ["recording", "status", "audio"]
    assert [line.split()[0] for line in lines[2:4]] == ["bp", "plain"]
    assert lines[-1].startswith("overall (2)")
    assert "5/8 62.5%" in lines[2] and "42" in lines[2]

    markdown = report_markdown(report).splitlines()
    assert len(markdown) == 5
    assert markdown[0].startswith("| recording | status |")
    assert markdown[1].startswith("| --- | --- | ---: |")
    assert markdown[2].startswith("| bp | succeeded | 0:30 | 0.0% | 3/4 75.0% | 5/8 62.5% |")
    assert markdown[4].startswith("| **overall (2)** | **2/2 ok** |")
    assert all(line.count("|") == 12 for line in markdown)


# --- the set -------------------------------------------------------------------------------


def _script(slug: str, **fields) -> dict:
    return {
        "slug": slug,
        "specialty": "family medicine",
        "title": "Back pain",
        "lines": [
            {"speaker": "Doctor", "text": "What brings you in today?"},
            {"speaker": "Patient", "text": "I have had back pain for one week."},
            {"speaker": "Doctor", "text": "Take ibuprofen, 400 milligrams, three times a day."},
            {"speaker": "Doctor", "text": "Follow up in two weeks."},
        ],
        # what the README's "reliable words" say tiny.en always hears in this recording
        "key_terms": [
            "back pain",
            "ibuprofen",
            "400 milligrams",
            "three times a day",
            "follow-up",
            "two weeks",
        ],
        "facts": [{"kind": "medication", "name": "ibuprofen", "value": "400 mg"}],
        "changes": [],
        **fields,
    }


def _pair(directory: Path, slug: str, *, extension: str = ".mp3", **fields) -> None:
    shutil.copy(SHORT_VISIT, directory / f"{slug}{extension}")
    (directory / f"{slug}.json").write_text(json.dumps(_script(slug, **fields)))


def test_a_set_pairs_recordings_of_any_accepted_extension_with_their_scripts(tmp_path):
    _pair(tmp_path, "b_short", extension=".MP3")
    _pair(tmp_path, "a_short", extension=".ogg")
    (tmp_path / "README.md").write_text("ignored")
    (tmp_path / ".hidden.json").write_text("{")

    items = evaluation_set_load(tmp_path)

    assert [(item.case.slug, item.recording.name) for item in items] == [
        ("a_short", "a_short.ogg"),
        ("b_short", "b_short.MP3"),
    ]
    assert items[0].case.script.startswith("What brings you in today? I have had back pain")


@pytest.mark.skipif(
    not (settings.BASE_DIR / "fixtures" / "eval").is_dir(), reason="no fixtures/eval"
)
def test_the_shipped_evaluation_set_is_well_formed():
    items = evaluation_set_load(settings.BASE_DIR / "fixtures" / "eval")
    assert items and all(item.case.key_terms for item in items)


def _break(directory: Path, how: str) -> None:
    if how == "missing json":
        _pair(directory, "good")
        shutil.copy(SHORT_VISIT, directory / "lonely.ogg")
    elif how == "missing recording":
        _pair(directory, "good")
        (directory / "orphan.json").write_text(json.dumps(_script("orphan")))
    elif how == "two recordings":
        _pair(directory, "twice")
        shutil.copy(SHORT_VISIT, directory / "twice.ogg")
    elif how == "invalid json":
        _pair(directory, "broken")
        (directory / "broken.json").write_text('{"slug": "broken", ')
    elif how == "not a script":
        _pair(directory, "wrong", lines=[])
    elif how == "slug mismatch":
        _pair(directory, "named")
        (directory / "named.json").write_text(json.dumps(_script("other")))
    elif how == "empty key term":
        _pair(directory, "terms", key_terms=["back pain", " -- "])
    elif how == "no words":
        _pair(directory, "silent", lines=[{"speaker": "Doctor", "text": "..."}])
    elif how == "empty":
        (directory / "README.md").write_text("no recordings here")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing directory", r"nowhere: no such directory"),
        ("missing json", r"incomplete: lonely\.ogg has no lonely\.json"),
        ("missing recording", r"incomplete: orphan\.json has no recording"),
        ("two recordings", r"2 recordings for twice: twice\.mp3, twice\.ogg"),
        ("invalid json", r"broken\.json: not a readable JSON file"),
        ("not a script", r"wrong\.json: not an evaluation script \(lines: List should have"),
        ("slug mismatch", r"named\.json: its slug 'other' is not its file name"),
        ("empty key term", r"terms\.json: not an evaluation script \(key_terms: .*has no words"),
        ("no words", r"silent\.json: its lines have no words"),
        ("empty", r"is empty: it needs pairs <slug>\.ogg \+ <slug>\.json"),
    ],
)
def test_a_bad_set_is_a_command_error_that_names_the_file(tmp_path, how, message):
    directory = tmp_path / "nowhere" if how == "missing directory" else tmp_path
    _break(directory, how)
    with pytest.raises(CommandError, match=message):
        call_command("evaluate", "--set", str(directory), stdout=StringIO(), stderr=StringIO())
    assert not Visit.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_unknown_clinician_is_a_command_error(tmp_path):
    _pair(tmp_path, "short")
    with pytest.raises(CommandError, match="No user named “nobody”"):
        call_command("evaluate", "--set", str(tmp_path), "--clinician", "nobody", stdout=StringIO())
    assert not Visit.objects.exists()


def test_a_refusal_is_an_application_error():
    with pytest.raises(EvaluationRefused):
        evaluation_set_load(Path("/nonexistent/eval"))


# --- a real run ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_evaluate_runs_the_real_pipeline_and_reports_sane_figures(tmp_path):
    _pair(tmp_path, "back_pain")
    out, err = StringIO(), StringIO()

    call_command("evaluate", "--set", str(tmp_path), "--json", stdout=out, stderr=err)

    report = EvaluationReport.model_validate_json(out.getvalue())
    (score,) = report.recordings
    assert (score.slug, score.recording, score.status, score.error) == (
        "back_pain",
        "back_pain.mp3",
        "succeeded",
        None,
    )
    assert score.wer < 0.5
    assert score.key_term_recall == 1.0 and score.missed_terms == []
    assert score.items > 0 and score.valid_evidence_share == 1.0
    assert (score.unsupported, score.unknown_drugs, score.wrong_numbers) == (0, 0, [])
    assert score.audio_seconds == pytest.approx(11.76, abs=0.2)
    assert 0 < score.seconds_per_audio_minute < 600
    assert score.transcription_model and score.engine

    overall = report.overall
    assert overall.wer == pytest.approx(score.wer)
    assert (overall.recordings, overall.succeeded, overall.key_term_recall) == (1, 1, 1.0)
    assert overall.seconds_per_audio_minute == pytest.approx(score.seconds_per_audio_minute)
    assert "[1/1] back_pain: succeeded in" in err.getvalue()

    visit = Visit.objects.get(pk=score.visit)
    assert visit.label == "evaluation: back_pain"
    assert visit.clinician.username == "evaluation"
    assert not visit.clinician.has_usable_password()
    assert visit.current_run.input["whisper_prompt"] == ""  # told nothing by default


@pytest.mark.django_db(transaction=True)
def test_with_vocabulary_transcription_is_told_the_specialtys_lexicon(tmp_path):
    _pair(tmp_path, "back_pain")
    out = StringIO()

    call_command(
        "evaluate", "--set", str(tmp_path), "--vocabulary", "--json", stdout=out, stderr=StringIO()
    )

    (score,) = EvaluationReport.model_validate_json(out.getvalue()).recordings
    case = json.loads((tmp_path / "back_pain.json").read_text())
    prompt = Visit.objects.get(pk=score.visit).current_run.input["whisper_prompt"]
    assert prompt == vocabulary_prompt(case["specialty"], []) and "Medications discussed" in prompt
    assert score.status == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_evaluate_prints_a_table_for_people(tmp_path, clinician):
    _pair(tmp_path, "back_pain")

    out = StringIO()
    call_command(
        "evaluate", "--set", str(tmp_path), "--clinician", "dr_ada", stdout=out, stderr=StringIO()
    )

    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["recording", "status", "audio", "WER"]
    assert set(lines[1]) == {"-"} and set(lines[3]) == {"-"}
    assert lines[2].split()[:3] == ["back_pain", "succeeded", "0:12"]
    assert "6/6 100.0%" in lines[2]
    assert lines[4].startswith("overall (1)  1/1 ok")
    assert Visit.objects.get().clinician == clinician
