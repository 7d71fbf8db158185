"""Build `clinical_vocabulary.json`, the general clinical lexicon that biases transcription.

Run from the repository root::

    .venv/bin/python visits/speech/data/build_vocabulary.py

Provenance. The lists below were compiled by the visit-pipeline team from general clinical
knowledge and public lists of the most-prescribed drugs in the United States (such as ClinCalc
DrugStats' Top 300), grouped by the specialty that uses them most. They were written without
reference to any recording, test fixture or evaluation script of this repository. Every drug
name is checked against the dictionary shipped by `drug-named-entity-recognition` (MIT;
built from DrugBank, MeSH, Wikipedia and the NHS); a name it does not know is refused here,
so the lexicon holds no misspelling. Each list keeps the order it is written in, the most
used first, because a prompt that runs out of room drops the last. The output is deterministic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from drug_named_entity_recognition import find_drugs

OUT = Path(__file__).resolve().parent / "clinical_vocabulary.json"

# specialty -> (drugs, other terms: conditions, tests, procedures, referrals)
SPECIALTIES: dict[str, tuple[str, str]] = {
    "primary care": (
        "metformin glipizide glimepiride sitagliptin empagliflozin dapagliflozin semaglutide "
        "insulin atorvastatin rosuvastatin simvastatin pravastatin lisinopril losartan amlodipine "
        "hydrochlorothiazide levothyroxine omeprazole pantoprazole famotidine albuterol "
        "montelukast cetirizine loratadine fluticasone amoxicillin azithromycin doxycycline "
        "cephalexin nitrofurantoin acetaminophen ibuprofen naproxen aspirin",
        "diabetes; hypertension; hyperlipidemia; hypothyroidism; A1c; hemoglobin; cholesterol; "
        "LDL; triglycerides; creatinine; eGFR; microalbumin; urinalysis; lipid panel; TSH; "
        "neuropathy; retinopathy; podiatry; ophthalmology; nutritionist; vaccination; "
        "influenza; pneumonia; sinusitis; bronchitis; urinary tract infection",
    ),
    "cardiology": (
        "metoprolol carvedilol atenolol propranolol diltiazem verapamil amiodarone digoxin "
        "apixaban rivaroxaban warfarin clopidogrel aspirin atorvastatin rosuvastatin ezetimibe "
        "lisinopril losartan valsartan sacubitril spironolactone furosemide torsemide "
        "hydralazine isosorbide nitroglycerin",
        "atrial fibrillation; heart failure; hypertension; angina; arrhythmia; tachycardia; "
        "bradycardia; palpitations; murmur; edema; ejection fraction; echocardiogram; "
        "electrocardiogram; EKG; Holter monitor; stress test; troponin; BNP; INR; "
        "catheterization; stent; cardiology",
    ),
    "pediatrics": (
        "amoxicillin cefdinir azithromycin acetaminophen ibuprofen cetirizine albuterol "
        "fluticasone prednisolone ondansetron hydrocortisone",
        "fever; otitis media; ear infection; strep throat; pharyngitis; bronchiolitis; croup; "
        "asthma; eczema; dehydration; rash; vaccination; immunizations; growth chart; "
        "percentile; milligrams per kilogram; pediatrics",
    ),
    "psychiatry": (
        "sertraline escitalopram citalopram fluoxetine paroxetine venlafaxine duloxetine "
        "bupropion mirtazapine trazodone buspirone hydroxyzine lorazepam clonazepam alprazolam "
        "quetiapine aripiprazole risperidone olanzapine lamotrigine lithium methylphenidate "
        "zolpidem",
        "depression; anxiety; panic attacks; insomnia; bipolar disorder; ADHD; PTSD; "
        "suicidal thoughts; PHQ-9; GAD-7; psychotherapy; cognitive behavioral therapy; "
        "counseling; psychiatry",
    ),
    "orthopedics": (
        "ibuprofen naproxen meloxicam diclofenac celecoxib acetaminophen tramadol "
        "cyclobenzaprine methocarbamol tizanidine baclofen prednisone triamcinolone",
        "osteoarthritis; arthritis; tendinitis; bursitis; sprain; strain; fracture; meniscus; "
        "ligament; ACL; rotator cuff; sciatica; stenosis; range of motion; degrees; flexion; "
        "extension; swelling; MRI; X-ray; cortisone injection; physical therapy; orthopedics",
    ),
    "dermatology": (
        "triamcinolone hydrocortisone clobetasol betamethasone mupirocin tretinoin "
        "clindamycin doxycycline cetirizine hydroxyzine methotrexate adalimumab "
        "ketoconazole terbinafine",
        "eczema; atopic dermatitis; psoriasis; acne; rosacea; urticaria; hives; cellulitis; "
        "melanoma; keratosis; plaque; lesion; biopsy; centimeters; moisturizer; emollient; "
        "dermatology",
    ),
    "endocrinology": (
        "levothyroxine liothyronine methimazole insulin metformin semaglutide liraglutide "
        "dulaglutide tirzepatide empagliflozin canagliflozin pioglitazone sitagliptin "
        "alendronate calcitriol ergocalciferol",
        "hypothyroidism; hyperthyroidism; thyroid nodule; TSH; free T4; A1c; insulin pump; "
        "continuous glucose monitor; osteoporosis; bone density; endocrinology",
    ),
    "gastroenterology": (
        "omeprazole esomeprazole pantoprazole lansoprazole famotidine sucralfate ondansetron "
        "metoclopramide dicyclomine loperamide docusate lactulose mesalamine budesonide "
        "linaclotide",
        "GERD; reflux; gastritis; ulcer; irritable bowel syndrome; Crohn's disease; colitis; "
        "constipation; diarrhea; colonoscopy; endoscopy; H. pylori; gastroenterology",
    ),
    "pulmonology": (
        "albuterol levalbuterol ipratropium tiotropium budesonide fluticasone salmeterol "
        "formoterol montelukast prednisone azithromycin benzonatate guaifenesin",
        "asthma; COPD; emphysema; shortness of breath; wheezing; inhaler; nebulizer; "
        "spirometry; peak flow; chest X-ray; sleep apnea; CPAP; pulmonology",
    ),
    "urology and gynecology": (
        "tamsulosin finasteride dutasteride oxybutynin tolterodine mirabegron sildenafil "
        "tadalafil nitrofurantoin phenazopyridine norethindrone medroxyprogesterone "
        "metronidazole fluconazole",
        "urinary tract infection; prostate; PSA; kidney stones; incontinence; pelvic exam; "
        "Pap smear; contraception; menopause; pregnancy; ultrasound; urology; gynecology",
    ),
    "neurology": (
        "gabapentin pregabalin topiramate levetiracetam lamotrigine sumatriptan rizatriptan "
        "amitriptyline nortriptyline donepezil",
        "migraine; seizure; epilepsy; neuropathy; tremor; dementia; stroke; numbness; "
        "tingling; MRI; CT scan; EEG; neurology",
    ),
}

# Drugs any visit may name, whatever the specialty: the common allergies and pain relievers.
COMMON_DRUGS = "penicillin amoxicillin sulfamethoxazole codeine ibuprofen acetaminophen aspirin"

# Words any visit may hold, whatever the specialty.
COMMON_TERMS = (
    "blood pressure; heart rate; pulse; temperature; oxygen saturation; weight; milligrams; "
    "micrograms; units; twice a day; once a day; every eight hours; as needed; follow-up; "
    "referral; prescription; refill; allergies; side effects; labs; blood work"
)


def _checked_drugs(names: str, specialty: str) -> list[str]:
    drugs = names.split()
    unknown = [name for name in drugs if not find_drugs([name])]
    if unknown:
        sys.exit(f"{specialty}: not in the drug dictionary: {', '.join(unknown)}")
    return list(dict.fromkeys(drugs))  # in the order written: the most used first


def _terms(text: str) -> list[str]:
    return list(dict.fromkeys(term.strip() for term in text.split(";") if term.strip()))


def main() -> None:
    lexicon: dict[str, Any] = {
        "provenance": (
            "Compiled by the visit-pipeline team from general clinical knowledge and public "
            "most-prescribed lists (e.g. ClinCalc DrugStats Top 300); drug names checked "
            "against drug-named-entity-recognition's dictionary. Never from test recordings. "
            "Built by visits/speech/data/build_vocabulary.py."
        ),
        "common": _terms(COMMON_TERMS),
        "common_drugs": _checked_drugs(COMMON_DRUGS, "common"),
        "specialties": {
            name: {"drugs": _checked_drugs(drugs, name), "terms": _terms(terms)}
            for name, (drugs, terms) in sorted(SPECIALTIES.items())
        },
    }
    OUT.write_text(json.dumps(lexicon, indent=1) + "\n")
    total = sum(len(s["drugs"]) + len(s["terms"]) for s in lexicon["specialties"].values())
    print(f"wrote {OUT} ({total} specialty entries, {len(lexicon['common'])} common terms)")


if __name__ == "__main__":
    main()
