"""Clinical-style text for the text exporters: the sentences every text export is checked on,
and a seeded, labelled triage set for the demo classifier.

Everything here is written for the purpose (no patient's record): short triage notes, long
discharge summaries well past 128 tokens (so truncation is exercised), abbreviations, numbers,
units, punctuation and a few typing slips, as notes look in a hospital's systems.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_DISCHARGE_1 = (
    "DISCHARGE SUMMARY. 78-year-old woman admitted via ED on 03/11 with 3 days of increasing "
    "shortness of breath, orthopnoea and bilateral ankle swelling. PMH: ischaemic heart disease "
    "(CABG 2014), AF on apixaban 5 mg BD, T2DM (HbA1c 61 mmol/mol), CKD stage 3b (eGFR 38). On "
    "arrival: HR 112 irregular, BP 148/92, RR 24, SpO2 89% on air, T 36.8. CXR: bilateral "
    "pleural effusions, upper lobe diversion. NT-proBNP 8,450 ng/L, troponin flat (14 -> 15 ng/L). "
    "Echo: LVEF 30-35%, moderate MR. Treated with IV furosemide 80 mg BD, weight down 4.2 kg over "
    "5 days, creatinine peaked at 168 umol/L and settled to 141. Bisoprolol increased to 5 mg OD, "
    "ramipril held while AKI, restarted at 1.25 mg. Sacubitril/valsartan to be considered in HF "
    "clinic. Discharged home with district nurse follow-up, daily weights, fluid restriction 1.5 L. "
    "Follow-up: HF nurse in 2 weeks, U&E in 1 week, cardiology clinic 6 weeks. Safety-netting "
    "advice given: return if weight up > 2 kg in 3 days, chest pain or worsening breathlessness."
)
_DISCHARGE_2 = (
    "Discharge summary - surgical. 46M, elective laparoscopic cholecystectomy for symptomatic "
    "gallstones, converted to open due to dense adhesions. Op note: Calot's triangle dissected, "
    "cystic duct and artery clipped and divided, gallbladder removed intact, drain left in situ. "
    "Post-op day 1: pain controlled on PCA morphine, tolerating fluids. Day 2: drain output 40 ml "
    "serous, removed. LFTs: bilirubin 18, ALP 132, ALT 64 - trending down. Mobilising independently, "
    "bowels opened day 3. Wound clean and dry, clips to be removed by practice nurse at day 10. "
    "Medications on discharge: paracetamol 1 g QDS, ibuprofen 400 mg TDS with food for 5 days, "
    "codeine 30 mg QDS PRN, lansoprazole 15 mg OD while on NSAID. Histology pending - will be "
    "reviewed in clinic. No driving for 4 weeks, no heavy lifting for 6 weeks. GP: please review "
    "wound and bloods if fever, jaundice or increasing abdominal pain; re-refer urgently if bile "
    "leak suspected (abdominal distension, shoulder-tip pain, tachycardia)."
)
_DISCHARGE_3 = (
    "Paediatric discharge letter: 4-year-old boy with 2-day history of fever (max 39.6 C), cough "
    "and increased work of breathing. Examination: RR 44, SpO2 91% in air, subcostal recession, "
    "crackles R base. CXR: right lower lobe consolidation. CRP 96 mg/L, WCC 18.2 x10^9/L. Treated "
    "with oral amoxicillin 250 mg TDS and low-flow O2 via nasal cannulae for 36 h, weaned to air "
    "with sats >= 94%. Eating and drinking well at discharge, afebrile for 24 h, parents confident. "
    "Plan: complete 5-day course of amoxicillin; no routine follow-up CXR; return if breathing fast, "
    "poor feeding, fewer wet nappies or fever returns after 48 hours. Immunisations up to date. "
    "Information leaflet on chest infections in children given and explained to both parents, "
    "who were happy with the plan and knew how to contact the ward for advice at any time."
)
_DISCHARGE_4 = (
    "Mental health liaison note: 29F seen in ED after intentional overdose of ~20 x 500 mg "
    "paracetamol tablets approx 6 h before arrival, taken after an argument with partner. Paracetamol "
    "level at 4 h above treatment line; acetylcysteine (NAC) infusion started per protocol, ALT normal, "
    "INR 1.1. Medically fit after completion of NAC and repeat bloods. Mental state: calm, good eye "
    "contact, mood 'low', no psychotic features, regrets the overdose, future-oriented (sister's "
    "wedding next month). Protective factors: supportive family, employed, no previous attempts. "
    "Risk assessed as moderate in the short term. Plan: discharge with crisis team follow-up within "
    "24 h, safety plan agreed and written down, means restriction discussed (tablets at home to be "
    "held by her mother), GP letter sent; advised to return or call the crisis line 24/7 if worse."
)

# Every text export is checked against its reference pipeline on these (with the caller's texts).
PARITY_SENTENCES: tuple[str, ...] = (
    "Chest pain.",
    "SOB on exertion",
    "Pt c/o headache x2/7, no photophobia.",
    "Fall at home, ? # NOF, L leg shortened & ext. rotated.",
    "BP 182/104, HR 96, asymptomatic.",
    "Temp 38.9C, HR 118, RR 22 -> sepsis screen +ve.",
    "Allergies: penicillin (rash), NKDA otherwise.",
    "Known COPD, baseline SpO2 88-92%.",
    "Reports dysuria and frequency for 3 days; urine dip: nitrites +, leucocytes ++.",
    "Sudden onset worst-ever headache while lifting weights, vomited twice.",
    "72 y/o M, R-sided weakness & slurred speech since 07:45 - FAST positive, stroke call.",
    "Child 18 months, barking cough, inspiratory stridor at rest, drooling: no.",
    "Medication review: metformin 1 g BD, atorvastatin 40 mg ON, amlodipine 5 mg OD.",
    "INR 6.4 on warfarin, no bleeding.",
    "Lac to L forearm ~4 cm, clean edges, tetanus up to date.",
    "Hypo: BM 2.1 mmol/L, given 150 ml orange juice, rpt BM 5.8.",
    "Pregnant 34/40, reduced fetal movements since last night.",
    "Anaphylaxis after peanut exposure: lip swelling, wheeze; IM adrenaline 0.5 mg given by partner.",
    "Post-op day 2, drain 50 ml serosanguinous, mobilising with frame.",
    "Wants repeat prescription for salbutamol inhaler.",
    "No acute distress. Alert & oriented x3.",
    "GCS 15/15, PEARL, no focal neuro deficit.",
    "Hb 72 g/L (was 118 last month), melaena x3 today.",
    "Creatinine 412 umol/L, K+ 6.8 mmol/L, ECG: peaked T waves.",
    "Review in 6/52 with repeat LFTs & lipid profile.",
    "Patient anxious, requesting to speak with the on-call registrar about her results.",
    "Mild eczema flare, advised emollients & 1% hydrocortisone BD for 7 days.",
    "RTC, driver, restrained, airbag deployed; c/o neck pain, C-spine immobilised.",
    "Smoker 20/day (30 pack-years), alcohol ~40 units/week, lives alone.",
    "DNACPR in place; ceiling of care: ward-based treatment.",
    '"Feels like an elephant sitting on my chest" - onset 20 min ago, sweaty, grey.',
    "Sats 84% RA -> 93% on 15 L NRB; RR 34; using accessory muscles.",
    "Discharged: safety-netting advice given; to return if symptoms worsen!",
    "Ortho referral: suspected scaphoid fracture (snuffbox tenderness), X-ray NAD, re-image 10-14 days.",
    "Chemo pt (day 9 post-cycle), T 38.3, neutrophils 0.3 - neutropenic sepsis pathway.",
    "Known epileptic, 2 tonic-clonic seizures today, back to baseline between them.",
    "Pt found on floor by carer ?long lie; CK 4,210 U/L; pressure areas intact.",
    "Reviewed by SHO @ 02:15 - plan: IV abx (pip-taz 4.5 g TDS), fluids 1 L/8 h, rpt lactate in 2 h.",
    _DISCHARGE_1,
    _DISCHARGE_2,
    _DISCHARGE_3,
    _DISCHARGE_4,
    # a ~1,000-word record: past any max_length a BERT-style encoder takes
    " ".join((_DISCHARGE_1, _DISCHARGE_2, _DISCHARGE_3, _DISCHARGE_4) * 2),
)

TRIAGE_CLASSES: tuple[str, ...] = ("routine", "urgent", "emergency")

_WOMEN = ("Pt", "Patient", "{age} y/o F", "{age}F", "{age}-year-old woman", "G2P1")
_PATIENTS = (
    "Pt",
    "Patient",
    "{age} y/o M",
    "{age} y/o F",
    "{age}M",
    "{age}F",
    "{age}-year-old man",
    "{age}-year-old woman",
    "Elderly pt",
    "Child ({child} yrs)",
    "Resident from care home",
)
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "routine": (
        "{p} attends for annual review of {chronic}; stable, no new complaints.",
        "{p} requests repeat prescription of {med}.",
        "{p}: BP {bp_ok}, HR {hr_ok}, feels well. Continue current meds.",
        "{p} with mild {minor} for {days} days, eating and drinking normally.",
        "{p}: wound check after {procedure}, healing well, no signs of infection.",
        "{p} here for routine {vaccine} vaccination, no acute concerns.",
        "{p} asks for fit note; mild cold symptoms, afebrile (T {temp_ok}).",
        "Follow-up of {chronic}, bloods within normal limits, review in {weeks}/52.",
        "{p} wants advice on stopping smoking; otherwise well.",
        "Medication review: {med} well tolerated, no side effects reported.",
        "{p} reports {minor} improving on simple analgesia, obs normal.",
        "Results discussion: HbA1c {hba1c} mmol/mol, lifestyle advice given.",
    ),
    "urgent": (
        "{p} with fever {temp_high}C for {days} days and productive cough, SpO2 {sat_mid}%.",
        "{p}: RIF pain since yesterday, vomited x{few}, T {temp_high}.",
        "{p} c/o dysuria and flank pain, T {temp_high}, HR {hr_high}; ?pyelonephritis.",
        "Laceration to {site} ~{cm} cm, bleeding controlled, needs closure.",
        "{p} fell, unable to weight-bear on {side} ankle, swollen and bruised.",
        "{p}, asthmatic, using inhaler every {few} hours, speaking in full sentences, PEF {pef}%.",
        "{p}, diabetic, BM {bm_high} mmol/L, polyuria and thirst, alert, ketones {ketones_mid}.",
        "{p} with new confusion since this morning, T {temp_high}, urine dip positive.",
        "Cellulitis of {side} lower leg spreading despite oral antibiotics, T {temp_high}.",
        "{p} with {days}-day history of diarrhoea and vomiting, dry mucous membranes, HR {hr_high}.",
        "Painful swollen {side} calf after long-haul flight, ?DVT.",
        "{f} reports PV bleeding at {weeks} weeks pregnant, haemodynamically stable.",
    ),
    "emergency": (
        "{p}: central crushing chest pain radiating to {side} arm, sweaty, onset {minutes} min ago.",
        "{p} unresponsive, GCS {gcs_low}, agonal breathing, CPR in progress.",
        "{p} with sudden facial droop and slurred speech, last known well {minutes} min ago.",
        "Anaphylaxis after {allergen}: stridor, BP {bp_low}, adrenaline given.",
        "{p}, RTC at high speed, HR {hr_very_high}, BP {bp_low}, GCS {gcs_mid}.",
        "{p} fitting continuously for over {minutes} minutes despite buccal midazolam.",
        "{p}: SpO2 {sat_low}% on room air, RR {rr_high}, cyanosed, exhausted.",
        "Massive haematemesis, {p} pale and clammy, HR {hr_very_high}, BP {bp_low}.",
        "{p} stabbed in the {site}, heavy bleeding, BP {bp_low}.",
        "{p} with meningococcal rash, T {temp_high}, drowsy, cap refill {crt} s.",
        "Ruptured AAA suspected: {p} with tearing back pain, BP {bp_low}, pulsatile mass.",
        "{p}: K+ {k_high} mmol/L with broad complex bradycardia on monitor.",
    ),
}
_FILLERS: dict[str, Sequence[str]] = {
    "chronic": ("hypertension", "type 2 diabetes", "hypothyroidism", "asthma", "COPD", "osteoarthritis", "AF"),
    "med": ("amlodipine 5 mg", "levothyroxine 75 mcg", "salbutamol inhaler", "metformin 500 mg", "sertraline 50 mg"),
    "minor": ("sore throat", "back ache", "runny nose", "earache", "heartburn", "knee pain", "rash"),
    "procedure": ("mole excision", "carpal tunnel release", "hernia repair", "toenail removal"),
    "site": ("forearm", "scalp", "hand", "shin", "chin", "abdomen", "chest", "thigh"),
    "side": ("left", "right", "L", "R"),
    "vaccine": ("flu", "COVID-19 booster", "shingles", "pneumococcal", "tetanus"),
    "allergen": ("peanuts", "a wasp sting", "IV co-amoxiclav", "shellfish", "latex"),
    "ketones_mid": ("0.8", "1.1", "1.4"),
}
_NUMBERS: dict[str, tuple[int, int]] = {
    "age": (19, 94),
    "child": (2, 12),
    "days": (2, 9),
    "weeks": (4, 26),
    "few": (2, 5),
    "cm": (2, 8),
    "minutes": (10, 50),
    "hr_ok": (60, 88),
    "hr_high": (101, 124),
    "hr_very_high": (128, 160),
    "sat_mid": (92, 95),
    "sat_low": (76, 87),
    "rr_high": (30, 42),
    "gcs_low": (3, 7),
    "gcs_mid": (8, 12),
    "pef": (55, 75),
    "hba1c": (44, 60),
    "crt": (4, 6),
}
_DECIMALS: dict[str, tuple[float, float]] = {
    "temp_ok": (36.4, 37.4),
    "temp_high": (38.1, 39.9),
    "bm_high": (15.0, 27.0),
    "k_high": (6.6, 7.9),
}


@dataclass(frozen=True, slots=True)
class LabelledTexts:
    texts_train: list[str]
    y_train: np.ndarray
    texts_test: list[str]
    y_test: np.ndarray


def _fill(template: str, rng: np.random.Generator) -> str:
    values: dict[str, str] = {}
    for key, (low, high) in _NUMBERS.items():
        values[key] = str(int(rng.integers(low, high + 1)))
    for key, (low_f, high_f) in _DECIMALS.items():
        values[key] = f"{rng.uniform(low_f, high_f):.1f}"
    for key, options in _FILLERS.items():
        values[key] = str(options[int(rng.integers(len(options)))])
    systolic_ok = int(rng.integers(112, 139))
    values["bp_ok"] = f"{systolic_ok}/{int(rng.integers(68, 88))}"
    values["bp_low"] = f"{int(rng.integers(62, 88))}/{int(rng.integers(30, 52))}"
    values["age"] = str(int(rng.integers(19, 44))) if "{f}" in template else values["age"]
    patient = _PATIENTS[int(rng.integers(len(_PATIENTS)))].format(**values)
    woman = _WOMEN[int(rng.integers(len(_WOMEN)))].format(**values)
    if not template.startswith("{p}"):  # mid-sentence: "pale and clammy, elderly pt ..."
        patient = patient[0].lower() + patient[1:]
    text = template.format(p=patient, f=woman, **values)
    return text[0].upper() + text[1:]


def triage_notes(seed: int, per_class: int = 100, test_fraction: float = 0.2) -> LabelledTexts:
    """`per_class` distinct notes for each of TRIAGE_CLASSES, drawn from templates with random
    patients, numbers and findings; labels index TRIAGE_CLASSES.

    The held-out `test_fraction` of each class comes from templates the training notes never
    use (a seeded fifth of each class's templates), so held-out accuracy measures phrasings the
    classifier has not seen rather than the same sentence with other numbers."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    parts: dict[bool, tuple[list[str], list[int]]] = {False: ([], []), True: ([], [])}
    for label, name in enumerate(TRIAGE_CLASSES):
        templates = _TEMPLATES[name]
        n_test = int(round(per_class * test_fraction))
        held = set(rng.choice(len(templates), size=max(1, int(round(len(templates) * test_fraction))), replace=False))
        for is_test, count in ((False, per_class - n_test), (True, n_test)):
            pool = [t for i, t in enumerate(templates) if (i in held) == is_test]
            made = attempts = 0
            while made < count:  # distinct notes only: no held-out note is also a training note
                attempts += 1
                if attempts > 50 * per_class:
                    raise ValueError(f"the {name!r} templates cannot make {count} distinct notes")
                text = _fill(pool[attempts % len(pool)], rng)
                if text in seen:
                    continue
                seen.add(text)
                parts[is_test][0].append(text)
                parts[is_test][1].append(label)
                made += 1
    (train_texts, train_y), (test_texts, test_y) = parts[False], parts[True]
    train_order = rng.permutation(len(train_texts))
    test_order = rng.permutation(len(test_texts))
    return LabelledTexts(
        [train_texts[i] for i in train_order],
        np.asarray(train_y, dtype=np.int64)[train_order],
        [test_texts[i] for i in test_order],
        np.asarray(test_y, dtype=np.int64)[test_order],
    )
