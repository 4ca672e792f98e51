"""CLCA data recipe: culture-adapted social scenarios, two-agent role-play, an LLM judge with a
meta-critique, per-utterance intents, and multi-turn SFT views of each kept dialogue.

    cm-ray synthesize configs/clca.yaml      (then: cm-ray train / route / evaluate)

Steps (Liu, Korhonen, Gurevych, ACL 2025): (1) a Sotopia-style seed scenario is adapted to each
culture, described by its Hofstede and Inglehart–Welzel positions, as JSON (setting, two people
with name, background, occupation, goal, secret); (2) two agents role-play up to ``max_turns``
turns, each turn an action (none, non-verbal, speak, leave) and its output; an agent sees the
other's background and occupation, never their goal or secret; (3) a judge at temperature 0 rates
quality and culture alignment, then a meta-critique rates both again, each with a confidence; the
dialogue is dropped when quality or meta-quality is "bad" with "very confident"; (4) each spoken
utterance gets a short intent; (5) rows: the dialogue from each speaker's side (task
``clca_dialogue``) and intent prediction (task ``clca_intent``), multi-turn ``messages``.

The ``clca:`` config section (all optional): scenarios_per_culture (1), max_turns (6), turn_max_new_tokens
(64), judge_max_new_tokens (96), turn_format (json). ``turn_format: json`` asks for the seed's
``{"action", "output"}`` per turn; ``text`` asks for the next line only and reads the action off it
(``*...*`` non-verbal, ``[leave]`` leave, nothing said: none, else speak; kept to two sentences).
Small models (SmolLM2-135M) answer the JSON form with "leave" on the first turn almost every time
but do write a spoken line in the text form.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cm_ray.artifacts import recipe_file, synth_summary_file
from cm_ray.config import Config
from cm_ray.data.filters import FilterLog
from cm_ray.generation.parsing import extract_json
from cm_ray.recipes.clca_prompts import (ACTIONS, INTENT_SCHEMA, JUDGE_SCHEMA, META_SCHEMA, PERSON_SCHEMA,
                                         SCENARIO_SCHEMA, SEED_SCENARIOS, TURN_SCHEMA, describe, intent_messages,
                                         judge_messages, persona_system, render_turn, scenario_messages,
                                         transcript)
from cm_ray.recipes.common import llm, recipe_row, write_synth


def valid_scenario(obj: Any) -> str | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("setting"), str) or len(obj["setting"].strip()) < 10:
        return "missing_setting"
    agents = obj.get("agents")
    if not isinstance(agents, list) or len(agents) != 2:
        return "not_two_agents"
    for a in agents:
        if not isinstance(a, dict) or any(not isinstance(a.get(k), str) or not a[k].strip() for k in PERSON_SCHEMA["required"]):
            return "incomplete_agent"
    if agents[0]["name"].strip().lower() == agents[1]["name"].strip().lower():
        return "same_names"
    return None


def _turn_request(d: dict, turn_format: str = "json") -> dict:
    k = len(d["turns"]) % 2
    if turn_format == "text":
        me, other = (d["scenario"]["agents"][i]["name"] for i in (k, 1 - k))
        user = (f"Conversation so far:\n{transcript(d)}\n\nWrite what {me} says next to {other}: one or two "
                "sentences, in character, nothing else. (A gesture instead: *like this*. To end the "
                "conversation: [leave].)")
        return {"d": d, "messages": [{"role": "system", "content": persona_system(d, k)},
                                     {"role": "user", "content": user}]}
    user = (f"Conversation so far:\n{transcript(d)}\n\nIt is your turn. Choose an action (none, non-verbal, "
            'speak, leave) and its output. Reply with JSON only: {"action": "...", "output": "..."}')
    return {"d": d, "messages": [{"role": "system", "content": persona_system(d, k)},
                                 {"role": "user", "content": user}], "json_schema": TURN_SCHEMA}


_LABEL = re.compile(r"^\s*[\"']?[^\s:\"'][^:\n]{0,30}:\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def parse_text_turn(text: str) -> dict | None:
    """A free-text turn as ``{"action", "output"}``; None when there is nothing usable.

    The text up to the next ``Name:`` line counts, without its own leading label or enclosing
    quotes, cut to two sentences.
    """
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return {"action": "none", "output": ""}
    said = [_LABEL.sub("", lines[0], count=1)]
    for ln in lines[1:]:
        if _LABEL.match(ln):
            break  # the model went on to write the other side
        said.append(ln)
    line = " ".join(said).strip()
    if len(line) > 1 and line[0] == line[-1] == '"':
        line = line[1:-1].strip()
    if "[leave]" in line.lower():
        return {"action": "leave", "output": re.sub(r"\[leave\]", "", line, flags=re.I).strip()}
    if len(line) > 2 and line.startswith("*") and line.endswith("*") and "*" not in line[1:-1]:
        return {"action": "non-verbal", "output": line[1:-1].strip()}
    line = " ".join(_SENTENCE_END.split(line)[:2]).strip()
    if not any(ch.isalpha() for ch in line):
        return None
    return {"action": "speak", "output": line}


def should_drop(verdict: dict) -> bool:
    """The seed's rule: bad quality or bad meta-quality, stated "very confident"."""
    return any(verdict.get(f"{p}quality") == "bad" and verdict.get(f"{p}quality_confidence") == "very confident"
               for p in ("", "meta_"))


def dialogue_views(d: dict) -> list[tuple[str, list[dict]]]:
    """(task, messages) SFT views: each speaker's side, then intent prediction when intents exist."""
    views = []
    for k in (0, 1):
        msgs = [{"role": "system", "content": persona_system(d, k)}]
        for t in d["turns"]:
            role = "assistant" if t["speaker"] == k else "user"
            if role == "assistant" and msgs[-1]["role"] == "system":
                msgs.append({"role": "user", "content": "(The conversation begins.)"})
            msgs.append({"role": role, "content": render_turn(t)})
        while msgs[-1]["role"] != "assistant" and len(msgs) > 1:
            msgs.pop()
        if any(m["role"] == "assistant" for m in msgs):
            views.append(("clca_dialogue", msgs))
    names = [a["name"] for a in d["scenario"]["agents"]]
    msgs = [{"role": "system", "content": f"Given the social expectations of {describe(d['culture'])}, state the "
                                          f"intent of each utterance. Setting: {d['scenario']['setting']}"}]
    for t in d["turns"]:
        if t.get("intent"):
            msgs += [{"role": "user", "content": f"{names[t['speaker']]}: {render_turn(t)}"},
                     {"role": "assistant", "content": t["intent"]}]
    if len(msgs) > 1:
        views.append(("clca_intent", msgs))
    return views


def run_clca_data(cfg: Config, store: Any, force: bool = False) -> dict:
    """Stage ``clca``: write multi-turn dialogue and intent rows under ``synth/``, drops counted."""
    opts = cfg.clca
    n_scen = opts.scenarios_per_culture
    max_turns = opts.max_turns
    turn_tokens, judge_tokens = opts.turn_max_new_tokens, opts.judge_max_new_tokens
    turn_format = opts.turn_format
    log = FilterLog()

    # 1. Culture-adapted scenarios.
    reqs = [{"culture": c, "seed": SEED_SCENARIOS[(j + i) % len(SEED_SCENARIOS)],
             "messages": scenario_messages(SEED_SCENARIOS[(j + i) % len(SEED_SCENARIOS)], c),
             "json_schema": SCENARIO_SCHEMA}
            for i, c in enumerate(cfg.cultures) for j in range(n_scen)]
    dialogues, dropped = [], []
    for out in llm(cfg, reqs, max_new_tokens=320, temperature=0.7, seed=cfg.seed):
        try:
            scen = extract_json(out["generated_text"], any_value=True)
            why = valid_scenario(scen)
        except ValueError:
            why = "not_json"
        if why:
            dropped.append(why)
        else:
            dialogues.append({"culture": out["culture"], "scenario": scen, "turns": [], "open": True,
                              "engine": out["engine"], "model": out["model"]})
    log.record("scenario", len(reqs), dropped)

    # 2. Role-play: one Ray Data pass per turn over the dialogues still open.
    for t in range(max_turns):
        active = [d for d in dialogues if d["open"]]
        if not active:
            break
        dropped = []
        for out in llm(cfg, [_turn_request(d, turn_format) for d in active], max_new_tokens=turn_tokens,
                       temperature=0.7, seed=cfg.seed + t):
            d = out["d"]
            try:
                turn = (parse_text_turn(out["generated_text"]) if turn_format == "text"
                        else extract_json(out["generated_text"], any_value=True))
                ok = isinstance(turn, dict) and turn.get("action") in ACTIONS and isinstance(turn.get("output"), str)
            except ValueError:
                ok = False
            if not ok or (turn["action"] in ("speak", "non-verbal") and not turn["output"].strip()):
                dropped.append("unparseable_ends_dialogue")
                d["open"] = False
                continue
            d["turns"].append({"speaker": t % 2, "action": turn["action"], "output": turn["output"]})
            d["open"] = turn["action"] != "leave"
        log.record("turn", len(active), dropped)
    kept, dropped = [], []  # dropped: every dialogue's reason, recorded after the judge
    for d in dialogues:
        if sum(t["action"] == "speak" for t in d["turns"]) < 2:
            dropped.append("fewer_than_two_utterances")
            d["drop_reason"] = "fewer_than_two_utterances"
        else:
            kept.append(d)

    # 3. Judge, then meta-critique (temperature 0).
    verdicts = {}
    for out in llm(cfg, [{"d": i, "messages": judge_messages(d), "json_schema": JUDGE_SCHEMA}
                         for i, d in enumerate(kept)],
                   max_new_tokens=judge_tokens, temperature=0.0, seed=cfg.seed):
        try:
            v = extract_json(out["generated_text"], any_value=True)
            verdicts[out["d"]] = v if isinstance(v, dict) and v.get("quality") in ("good", "bad") else None
        except ValueError:
            verdicts[out["d"]] = None
    meta_reqs = [{"d": i, "messages": judge_messages(d, f"A first judge said: {json.dumps(verdicts[i])}\nCritique "
                                                        "that judgement, then give your own meta-ratings.\n"),
                  "json_schema": META_SCHEMA} for i, d in enumerate(kept) if verdicts.get(i)]
    for out in llm(cfg, meta_reqs, max_new_tokens=judge_tokens, temperature=0.0, seed=cfg.seed):
        try:
            m = extract_json(out["generated_text"], any_value=True)
            if isinstance(m, dict) and m.get("meta_quality") in ("good", "bad"):
                verdicts[out["d"]] = {**verdicts[out["d"]], **m}
            else:
                verdicts[out["d"]] = None
        except ValueError:
            verdicts[out["d"]] = None
    judged = []
    for i, d in enumerate(kept):
        v = verdicts.get(i)
        if v is None:
            dropped.append("judge_unparseable")
            d["drop_reason"] = "judge_unparseable"
        elif should_drop(v):
            dropped.append("judged_bad_very_confident")
            d["drop_reason"], d["verdict"] = "judged_bad_very_confident", v
        else:
            d["verdict"] = v
            judged.append(d)
    log.record("dialogue", len(dialogues), dropped)

    # 4. One intent per spoken utterance.
    ireqs = [{"d": d, "j": j, "json_schema": INTENT_SCHEMA,
              "messages": intent_messages(d, {**d, "turns": d["turns"][:j + 1]})}
             for d in judged for j, turn in enumerate(d["turns"]) if turn["action"] == "speak"]
    dropped = []
    for out in llm(cfg, ireqs, max_new_tokens=48, temperature=0.0, seed=cfg.seed):
        try:
            intent = extract_json(out["generated_text"], any_value=True).get("intent")
        except (ValueError, AttributeError):
            intent = None
        if isinstance(intent, str) and intent.strip():
            out["d"]["turns"][out["j"]]["intent"] = intent.strip()
        else:
            dropped.append("unparseable")
    log.record("intent", len(ireqs), dropped)

    # 5. SFT views as synth rows.
    rows = []
    for d in judged:
        for task, msgs in dialogue_views(d):
            first_user = next(m["content"] for m in msgs if m["role"] == "user")
            last = [m["content"] for m in msgs if m["role"] == "assistant"][-1]
            sample = {"scenario": d["scenario"], "turns": d["turns"], "verdict": d["verdict"]}
            rows.append(recipe_row(cfg, culture=d["culture"], task=task, sample=sample,
                                   input=f"{d['scenario']['setting']}\n{first_user}", output=last, messages=msgs,
                                   label=None, engine=d["engine"], model=d["model"], prompt=d["scenario"]))
    counts = write_synth(store, rows, cfg.cultures, cfg.synthesis.validation_fraction)
    summary = {"recipe": "clca", "scenarios_requested": len(reqs), "dialogues": len(dialogues),
               "dialogues_kept": len(judged), "rows": len(rows), "rows_per_culture_task": counts,
               "drops": log.drop_counts()}
    store.write_json(summary, *synth_summary_file())
    # Every dialogue, kept or not (with its drop reason), for inspection.
    store.write_json([{k: v for k, v in d.items() if k != "open"} for d in dialogues],
                     *recipe_file("clca", "dialogues.json"))
    summary["headline"] = f"{len(judged)}/{len(reqs)} dialogues kept, {len(rows)} SFT rows"
    return summary
