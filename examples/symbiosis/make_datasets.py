"""Write the small example datasets used by the README's fine-tuning examples (deterministic).

    python examples/symbiosis/make_datasets.py        # -> examples/symbiosis/data/*.jsonl

- ``chat.jsonl``: conversations in the ``{"messages": [...]}`` schema (arithmetic, opposites, word
  translations), some with a system message.
- ``qa.jsonl``: the same kind of facts as ``{"prompt": ..., "completion": ...}`` pairs.
- ``text.jsonl``: short plain-text sentences as ``{"text": ...}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
OPPOSITES = [("hot", "cold"), ("up", "down"), ("early", "late"), ("open", "closed"), ("light", "dark"), ("quick", "slow"), ("wide", "narrow"), ("first", "last")]
FRENCH = [("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("water", "eau"), ("bread", "pain"), ("sun", "soleil"), ("moon", "lune"), ("tree", "arbre"), ("book", "livre")]
ANIMALS = [("cat", "sleeps in the sun"), ("dog", "guards the gate"), ("owl", "hunts at night"), ("rabbit", "is quick"), ("bear", "is strong"), ("hen", "lays eggs"), ("fox", "runs through the forest")]
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
PLACES = ["by the river", "in the market square", "at the lighthouse", "on the hill", "near the school"]
SYSTEM = "You are a small, helpful assistant. Answer in one short sentence."


def qa_pair(rng: random.Random) -> tuple[str, str]:
    """One question and its answer, drawn from three kinds of facts."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(7), rng.randrange(6)
        return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    if kind == 1:
        word, opposite = rng.choice(OPPOSITES)
        return f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."
    english, french = rng.choice(FRENCH)
    return f"How do you say {english} in French?", f"In French, {english} is {french}."


def chat_record(rng: random.Random) -> dict:
    turns = rng.choice([1, 1, 2])
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(turns):
        question, answer = qa_pair(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def qa_record(rng: random.Random) -> dict:
    question, answer = qa_pair(rng)
    return {"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"}


def text_record(rng: random.Random) -> dict:
    animal, habit = rng.choice(ANIMALS)
    return {"text": f"On {rng.choice(DAYS)} the {animal} {rng.choice(PLACES)} {habit}."}


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    rng = random.Random(0)
    for name, make, count in (("chat", chat_record, 300), ("qa", qa_record, 300), ("text", text_record, 200)):
        lines = [json.dumps(make(rng)) for _ in range(count)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {out / name}.jsonl ({count} lines)")


if __name__ == "__main__":
    main()
