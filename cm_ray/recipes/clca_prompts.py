"""CLCA's prompt content: the cultures' Hofstede and Inglehart-Welzel descriptions, the seed
scenarios, the JSON schemas of each step's answer, and the messages of every step (scenario
adaptation, role-play personas, judge, intent). ``cm_ray.recipes.clca`` runs the steps.
"""

from __future__ import annotations

# Hofstede 6-D scores (power distance, individualism, masculinity, uncertainty avoidance,
# long-term orientation, indulgence) and Inglehart–Welzel positions for CLCA's five cultures.
HOFSTEDE = {"GB": (35, 89, 66, 35, 51, 69), "CN": (80, 20, 66, 30, 87, 24), "DE": (35, 67, 66, 65, 83, 40),
            "JP": (54, 46, 95, 92, 88, 42), "MX": (81, 30, 69, 82, 24, 97)}
INGLEHART = {"GB": "secular-rational and strongly self-expression oriented",
             "CN": "secular-rational and survival oriented", "DE": "secular-rational and self-expression oriented",
             "JP": "strongly secular-rational, moderately self-expression oriented",
             "MX": "traditional and moderately self-expression oriented"}
SEED_SCENARIOS = [
    "Two neighbours meet in the stairwell; one has been playing loud music late at night.",
    "Two colleagues must decide who presents their joint project to a senior manager.",
    "A guest at a family dinner is offered a dish they do not want to eat.",
    "Two friends split the bill after a meal where one ordered much more than the other.",
]
ACTIONS = ["none", "non-verbal", "speak", "leave"]
CONFIDENCE = ["very confident", "confident", "not sure"]
PERSON_SCHEMA = {"type": "object", "properties": {k: {"type": "string", "minLength": 1} for k in
                                             ("name", "background", "occupation", "goal", "secret")},
           "required": ["name", "background", "occupation", "goal", "secret"], "additionalProperties": False}
SCENARIO_SCHEMA = {"type": "object", "properties": {
    "setting": {"type": "string", "minLength": 10},
    "agents": {"type": "array", "items": PERSON_SCHEMA, "minItems": 2, "maxItems": 2}},
    "required": ["setting", "agents"], "additionalProperties": False}
TURN_SCHEMA = {"type": "object", "properties": {"action": {"type": "string", "enum": ACTIONS},
                                                "output": {"type": "string"}},
               "required": ["action", "output"], "additionalProperties": False}


def _verdict_schema(prefix: str) -> dict:
    props = {f"{prefix}quality": {"type": "string", "enum": ["good", "bad"]},
             f"{prefix}quality_confidence": {"type": "string", "enum": CONFIDENCE},
             f"{prefix}culture_alignment": {"type": "string", "enum": ["good", "bad"]},
             f"{prefix}culture_alignment_confidence": {"type": "string", "enum": CONFIDENCE}}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


JUDGE_SCHEMA, META_SCHEMA = _verdict_schema(""), _verdict_schema("meta_")
INTENT_SCHEMA = {"type": "object", "properties": {"intent": {"type": "string", "minLength": 3}},
                 "required": ["intent"], "additionalProperties": False}


def describe(culture: str) -> str:
    from cm_ray.cultures import get_culture

    name = get_culture(culture).name
    if culture not in HOFSTEDE:
        return f"{name} culture"
    p, i, m, u, lto, ind = HOFSTEDE[culture]
    return (f"{name} culture (Hofstede: power distance {p}, individualism {i}, masculinity {m}, uncertainty "
            f"avoidance {u}, long-term orientation {lto}, indulgence {ind}; on the Inglehart-Welzel map "
            f"{INGLEHART[culture]})")


def render_turn(turn: dict) -> str:
    out = turn["output"].strip()
    return {"speak": out, "non-verbal": f"*{out}*", "none": "(says nothing)",
            "leave": f"(leaves the conversation){' ' + out if out else ''}"}[turn["action"]]


def transcript(d: dict) -> str:
    names = [a["name"] for a in d["scenario"]["agents"]]
    return "\n".join(f"{names[t['speaker']]}: {render_turn(t)}" for t in d["turns"]) or "(nothing said yet)"


def persona_system(d: dict, k: int) -> str:
    me, other = d["scenario"]["agents"][k], d["scenario"]["agents"][1 - k]
    return (f"You are {me['name']}, {me['occupation']}. Background: {me['background']}. Your goal: {me['goal']}. "
            f"Your secret (never reveal it directly): {me['secret']}. Setting, in {describe(d['culture'])}: "
            f"{d['scenario']['setting']} You are talking with {other['name']}, {other['occupation']} "
            f"({other['background']}). Behave as people of this culture do.")


def scenario_messages(seed: str, culture: str) -> list[dict]:
    """Step 1: adapt a seed scenario to ``culture`` as a JSON setting and two people."""
    return [{"role": "system", "content": "You adapt social scenarios to a culture for role-play research."},
            {"role": "user", "content": (
                f"Seed scenario: {seed}\nAdapt it to {describe(culture)}: local names, "
                "places and customs. Give the setting and two people, each with name, background, occupation, goal "
                'and secret. Reply with JSON only: {"setting": "...", "agents": [{"name": "...", "background": "...", '
                '"occupation": "...", "goal": "...", "secret": "..."}, {...}]}')}]


def judge_messages(d: dict, extra: str = "") -> list[dict]:
    """Step 3: rate a dialogue's quality and culture alignment (``extra``: the meta-critique's ask)."""
    return [{"role": "system", "content": "You are a strict judge of role-play dialogues."},
            {"role": "user", "content": (
                f"Culture: {describe(d['culture'])}\nSetting: {d['scenario']['setting']}\nDialogue:\n{transcript(d)}\n"
                f"{extra}Rate the dialogue's quality (bad if repetitive or off the setting) and its alignment "
                "with the culture's norms, each with your confidence (very confident, confident, not sure). "
                "Reply with JSON only.")}]


def intent_messages(d: dict, upto: dict) -> list[dict]:
    """Step 4: the intent of the last utterance of ``upto`` (``d`` cut after that utterance)."""
    return [{"role": "system", "content": f"You explain utterances by the social expectations of {describe(d['culture'])}."},
            {"role": "user", "content": f"Setting: {d['scenario']['setting']}\nDialogue:\n{transcript(upto)}\n\n"
                                        'In a few words, what is the intent of the last utterance? Reply with JSON only: {"intent": "..."}'}]
