"""The note's life: versions and signatures, evidence checks of values, the offline engine and
the prompts, the FHIR document."""
