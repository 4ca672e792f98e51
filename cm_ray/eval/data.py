"""Readers for the public evaluation data (World Values Survey via CultureSPA, CultureLLM's
culture_tasks, BLEnD), keyed by cm_ray culture keys.

Every reader takes the data root as an argument and returns plain dicts; a culture the data does
not cover gives an empty list, never an error. ``find_data_dir`` resolves the root: the configured
``evaluate.data_dir``, else ``../shared/data`` beside the working directory, else None.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cm_ray.cultures import get_culture

# WVS questions whose answer codes start at 0 (option index = code); all others are 1-based.
_ZERO_BASED = {*(f"Q{i}" for i in range(94, 106)), "Q119", *(f"Q{i}" for i in range(122, 130)),
               *(f"Q{i}" for i in range(241, 250))}
# CLCA evaluates on the social-values block Q1–Q45 without Q42.
CLCA_WVS = [f"Q{i}" for i in range(1, 46) if i != 42]

# CultureLLM folders by language culture, and the sets in each that are offensive/hate-speech
# style binary tasks (the `offensive` TaskSpec). Spam, fine-grained and multi-class sets are left
# out on purpose: their labels do not map onto offensive / not_offensive.
CULTURE_TASK_FOLDERS = {"en": "English", "zh": "China", "es": "Spanish", "de": "Germany", "ar": "Arabic"}
CULTURE_TASK_SETS = {
    "English": ["OLID/offense.jsonl", "HateEval 2019/hateval2019_en_test.jsonl", "HASOC2020/data.jsonl"],
    "China": ["CDial-Bias/gender-2.jsonl"],  # 1 = gender-biased statement
    "Spanish": ["MEX-A3T_offens/data-2.jsonl", "OffendES_offens/data-2.jsonl", "HaterNet_HS/data-2.jsonl"],
    "Germany": ["GermEval/germeval2018.jsonl", "HASOC/hate_off_detect.jsonl"],
    "Arabic": ["OffensEval2020/OffensEval.jsonl", "OSACT4/dev_data_offens.jsonl", "MP/offens.jsonl"],
}
# Sets from one country rank first for that country (MEX-A3T is Mexican Spanish).
_PREFERRED = {"MX": "MEX-A3T_offens/data-2.jsonl", "ES": "OffendES_offens/data-2.jsonl"}
POSITIVE = {"OFF", "HS", "HOF", "1", "BAD", "V"}
NEGATIVE = {"NOT", "NOT_HS", "0", "GOOD", "-", "NONE"}
# BLEnD country files by culture key.
BLEND_FILES = {"US": "US", "GB": "UK", "CN": "China", "MX": "Mexico", "ES": "Spain", "KR": "South_Korea",
               "IR": "Iran", "ID": "Indonesia"}


def find_data_dir(configured: str | None = None) -> Path | None:
    """The evaluation data root, or None when there is none (the project runs without it)."""
    if configured:
        p = Path(configured).expanduser()
        return p if p.exists() else None
    for cand in (Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"):
        if cand.exists():
            return cand
    return None


# -- World Values Survey (CultureSPA) ---------------------------------------------------------
@dataclass
class WVSQuestion:
    qid: str
    question: str
    options: list[str]


@lru_cache(maxsize=4)
def _wvs_files(root: str) -> tuple[dict, dict]:
    base = Path(root) / "wvs_culturespa"
    questions = json.loads((base / "wvs_questions.json").read_text())
    props = json.loads((base / "proportions_group_by_country.json").read_text())
    return {q["Q_id"]: q for q in questions}, props


def wvs_available(root: Path | None) -> bool:
    return root is not None and (Path(root) / "wvs_culturespa" / "wvs_questions.json").exists()


def wvs_questions(root: Path) -> list[WVSQuestion]:
    """All 290 WVS questions in file order (the CultureSPA recipe uses them as seeds)."""
    qs, _ = _wvs_files(str(root))
    return [WVSQuestion(q["Q_id"], q["question"], list(q["option_lst"])) for q in qs.values()]


def wvs_items(root: Path, culture: str, subset: list[str] | None = None,
              max_items: int | None = None, seed: int = 0) -> list[dict]:
    """Survey items for one culture: question, options, gold distribution over option indices.

    Returns dicts ``{qid, question, options, dist (list[float], by 0-based option index),
    majority (int index)}``; questions without answers for the culture are skipped.
    """
    qs, props = _wvs_files(str(root))
    country = props.get(get_culture(culture).alpha3)
    if country is None:
        return []
    out = []
    for qid, answers in country.items():
        if not answers or qid not in qs or (subset is not None and qid not in subset):
            continue
        opts = list(qs[qid]["option_lst"])
        dist = [0.0] * len(opts)
        shift = 0 if qid in _ZERO_BASED else 1
        for code, share in answers.items():
            idx = int(code) - shift
            if 0 <= idx < len(opts):
                dist[idx] += float(share)
        if sum(dist) <= 0:
            continue
        # The file lists the majority answer first.
        majority = int(next(iter(answers))) - shift
        out.append({"qid": qid, "question": qs[qid]["question"], "options": opts,
                    "dist": [d / sum(dist) for d in dist], "majority": majority})
    return _sample(out, max_items, seed)


# -- culture_tasks (CultureLLM) ---------------------------------------------------------------
def culture_task_items(root: Path, culture: str, max_items: int | None = None, seed: int = 0) -> list[dict]:
    """Binary offensive-style items for a culture: ``{text, label, dataset}``.

    ``label`` is mapped to the ``offensive`` task's labels (offensive / not_offensive). The culture's
    first language picks the folder (GB -> English, CN -> China, MX -> Spanish, DE -> Germany).
    """
    folder = CULTURE_TASK_FOLDERS.get(get_culture(culture).language)
    if folder is None or not (Path(root) / "culture_tasks" / folder).exists():
        return []
    sets = list(CULTURE_TASK_SETS[folder])
    if culture in _PREFERRED and _PREFERRED[culture] in sets:
        sets.remove(_PREFERRED[culture])
        sets.insert(0, _PREFERRED[culture])
    per_set = []
    for rel in sets:
        path = Path(root) / "culture_tasks" / folder / rel
        if not path.exists():
            continue
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            text = d.get("data") or d.get("tweet") or d.get("comment") or d.get("text")
            lab = str(d.get("label")).strip()
            if not text or lab not in POSITIVE | NEGATIVE:
                continue
            rows.append({"text": str(text).strip(), "dataset": f"{folder}/{rel}",
                         "label": "offensive" if lab in POSITIVE else "not_offensive"})
        per_set.append(_sample(rows, max_items, seed))
    # Interleave the sets so a small budget still covers each of them.
    mixed = [r for group in _zip_longest(per_set) for r in group]
    return mixed[:max_items] if max_items else mixed


def _zip_longest(lists: list[list]) -> list[list]:
    n = max((len(x) for x in lists), default=0)
    return [[x[i] for x in lists if i < len(x)] for i in range(n)]


# -- BLEnD ------------------------------------------------------------------------------------
def blend_items(root: Path, culture: str, max_items: int | None = None, seed: int = 0) -> list[dict]:
    """Short-answer questions: ``{id, question (English), local_question, answers, topic}``."""
    name = BLEND_FILES.get(culture)
    base = Path(root) / "blend"
    if name is None or not (base / "annotations" / f"{name}_data.json").exists():
        return []
    ann = json.loads((base / "annotations" / f"{name}_data.json").read_text(encoding="utf-8"))
    topics = {}
    qfile = base / "questions" / f"{name}_questions.csv"
    if qfile.exists():
        with qfile.open(encoding="utf-8") as fh:
            topics = {r["ID"]: r.get("Topic", "") for r in csv.DictReader(fh)}
    out = []
    for qid, d in ann.items():
        answers = sorted({a for grp in d.get("annotations", []) for a in
                          [*grp.get("answers", []), *grp.get("en_answers", [])] if a and a.strip()})
        if not answers:
            continue
        out.append({"id": qid, "question": d.get("en_question") or d["question"],
                    "local_question": d["question"], "answers": answers, "topic": topics.get(qid, "")})
    return _sample(out, max_items, seed)


# -- router evaluation ------------------------------------------------------------------------
ROUTER_TASK_SETS = {"MX": ["Spanish/MEX-A3T_offens/data-2.jsonl"],
                    "ES": ["Spanish/OffendES_offens/data-2.jsonl", "Spanish/HaterNet_HS/data-2.jsonl"],
                    "DE": ["Germany/GermEval/germeval2018.jsonl", "Germany/HASOC/hate_off_detect.jsonl"],
                    "CN": ["China/CDial-Bias/gender-2.jsonl"]}
"""culture_tasks sets whose texts come from one country (Mexican and Spanish tweets, German
tweets, Chinese forum posts); the English and Arabic sets mix countries, so they label no culture."""


def router_items(root: Path, cultures: list[str], max_items: int | None = None, seed: int = 0) -> list[dict]:
    """Real culture-marked texts: BLEnD local-language questions + one-country culture_tasks texts.

    Returns ``{text, culture, source}`` (source ``blend`` or the set's path), at most ``max_items``
    per culture and source. English BLEnD questions name their country ("...in the UK?"), so the
    local-language versions are used; they still name it, the culture_tasks texts do not.
    """
    out = []
    for c in cultures:
        out += [{"text": b["local_question"], "culture": c, "source": "blend"}
                for b in blend_items(root, c, max_items, seed)]
        for rel in ROUTER_TASK_SETS.get(c, []):
            path = Path(root) / "culture_tasks" / rel
            if not path.exists():
                continue
            rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
            texts = [str(t).strip() for d in rows if (t := d.get("data") or d.get("tweet") or d.get("text"))]
            out += [{"text": t, "culture": c, "source": f"culture_tasks/{rel}"}
                    for t in _sample(texts, max_items, seed)]
    return out


def _sample(rows: list, k: int | None, seed: int) -> list:
    if k is None or len(rows) <= k:
        return rows
    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(rows)), k))
    return [rows[i] for i in idx]


def parse_option_number(text: str, n_options: int) -> int | None:
    """0-based index of the first option number 1..n in ``text`` (a bare int or JSON), else None."""
    m = re.search(r"\d+", str(text))
    if not m:
        return None
    k = int(m.group())
    return k - 1 if 1 <= k <= n_options else None
