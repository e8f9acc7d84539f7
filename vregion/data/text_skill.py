"""The text-skill set: items that measure the LLM inside an LVLM before and after visual tuning.

The set is generated here, deterministically from a seed (no download), in two parts:

- **Multiple choice** (`type: "mc"`): a question with four candidate replies, from seven
  families (arithmetic, capital cities, antonyms, word categories, unit facts, the day or month
  after a given one, general knowledge). The four candidates are the same short sentence with
  a different answer in it ("The capital of Norway is Oslo." / "... is London."). Each is
  scored by its summed log-likelihood as the assistant's reply to the question, in the model's
  own chat template with the given system message; the item is correct when the right reply
  scores highest. `mc_accuracy` is the share of correct items; chance is 0.25.
- **Held-out answers** (`type: "ppl"`): instructions with one reference reply (short factual
  answers as full sentences, upper-casing a word, sorting numbers, plurals, numbers in words).
  `answer_nll` is the mean negative log-likelihood per token of the reference replies given
  their instructions (pooled over all reply tokens), `answer_ppl` its exponential. No item
  is ever trained on.

Scoring lives in `vregion.eval.text_skill`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Embedded content (well known facts a small instruct LM has seen many times)

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "the United Kingdom": "London",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Argentina": "Buenos Aires",
    "Kenya": "Nairobi",
    "India": "New Delhi",
    "South Korea": "Seoul",
    "Thailand": "Bangkok",
    "Denmark": "Copenhagen",
    "Finland": "Helsinki",
    "Hungary": "Budapest",
    "Cuba": "Havana",
    "Peru": "Lima",
    "the Czech Republic": "Prague",
}

ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "wet": "dry",
    "full": "empty",
    "early": "late",
    "long": "short",
    "rich": "poor",
    "strong": "weak",
    "thick": "thin",
    "loud": "quiet",
    "clean": "dirty",
    "day": "night",
    "win": "lose",
    "push": "pull",
    "first": "last",
    "inside": "outside",
    "true": "false",
    "alive": "dead",
    "love": "hate",
    "friend": "enemy",
    "top": "bottom",
    "always": "never",
    "question": "answer",
    "north": "south",
    "buy": "sell",
}

CATEGORIES = {
    "an animal": ["dog", "cat", "horse", "cow", "lion", "elephant", "rabbit", "sheep", "monkey"],
    "a fruit": ["apple", "banana", "grape", "pear", "cherry", "lemon", "peach", "mango"],
    "a colour": ["red", "blue", "green", "yellow", "purple", "pink", "brown"],
    "a vehicle": ["car", "bus", "train", "bicycle", "truck", "airplane", "boat"],
    "a piece of furniture": ["chair", "table", "bed", "sofa", "desk", "shelf"],
    "a piece of clothing": ["shirt", "shoe", "hat", "sock", "coat", "dress"],
}

# (question, reply with {} for the answer, answer, distractors)
UNIT_FACTS = [
    (
        "How many minutes are in an hour?",
        "There are {} minutes in an hour.",
        "60",
        ["100", "24", "30"],
    ),
    (
        "How many seconds are in a minute?",
        "There are {} seconds in a minute.",
        "60",
        ["100", "10", "24"],
    ),
    ("How many hours are in a day?", "There are {} hours in a day.", "24", ["12", "60", "7"]),
    ("How many days are in a week?", "There are {} days in a week.", "7", ["5", "10", "12"]),
    ("How many months are in a year?", "There are {} months in a year.", "12", ["10", "7", "52"]),
    ("How many days are in a year?", "There are {} days in a year.", "365", ["100", "52", "1000"]),
    (
        "How many centimeters are in a meter?",
        "There are {} centimeters in a meter.",
        "100",
        ["10", "1000", "12"],
    ),
    (
        "How many meters are in a kilometer?",
        "There are {} meters in a kilometer.",
        "1000",
        ["100", "10", "60"],
    ),
    (
        "How many grams are in a kilogram?",
        "There are {} grams in a kilogram.",
        "1000",
        ["100", "10", "12"],
    ),
    ("How many weeks are in a year?", "There are {} weeks in a year.", "52", ["12", "365", "7"]),
    (
        "How many years are in a century?",
        "There are {} years in a century.",
        "100",
        ["10", "1000", "50"],
    ),
    (
        "How many years are in a decade?",
        "There are {} years in a decade.",
        "10",
        ["100", "12", "5"],
    ),
    ("How many sides does a triangle have?", "A triangle has {} sides.", "3", ["4", "5", "6"]),
    ("How many sides does a square have?", "A square has {} sides.", "4", ["3", "5", "6"]),
    (
        "How many cents are in a dollar?",
        "There are {} cents in a dollar.",
        "100",
        ["10", "50", "1000"],
    ),
    (
        "How many millimeters are in a centimeter?",
        "There are {} millimeters in a centimeter.",
        "10",
        ["100", "1000", "12"],
    ),
    (
        "How many minutes are in half an hour?",
        "There are {} minutes in half an hour.",
        "30",
        ["60", "15", "45"],
    ),
    ("How many inches are in a foot?", "There are {} inches in a foot.", "12", ["10", "100", "3"]),
]

GENERAL_FACTS = [
    (
        "What color is the sky on a clear day?",
        "The sky is {} on a clear day.",
        "blue",
        ["green", "red", "brown"],
    ),
    ("What color is grass?", "Grass is {}.", "green", ["blue", "red", "purple"]),
    (
        "Which planet is known as the Red Planet?",
        "{} is known as the Red Planet.",
        "Mars",
        ["Venus", "Jupiter", "Saturn"],
    ),
    (
        "What is the largest planet in our solar system?",
        "{} is the largest planet in our solar system.",
        "Jupiter",
        ["Mars", "Mercury", "Venus"],
    ),
    ("What do bees make?", "Bees make {}.", "honey", ["milk", "silk", "wool"]),
    (
        "What is frozen water called?",
        "Frozen water is called {}.",
        "ice",
        ["steam", "sand", "glass"],
    ),
    (
        "Which animal is known as the king of the jungle?",
        "The {} is known as the king of the jungle.",
        "lion",
        ["mouse", "cow", "rabbit"],
    ),
    (
        "Which ocean is the largest?",
        "The {} Ocean is the largest ocean.",
        "Pacific",
        ["Atlantic", "Indian", "Arctic"],
    ),
    (
        "Who wrote Romeo and Juliet?",
        "Romeo and Juliet was written by {}.",
        "William Shakespeare",
        ["Charles Dickens", "Mark Twain", "Jane Austen"],
    ),
    (
        "At what temperature does water boil?",
        "Water boils at {} degrees Celsius.",
        "100",
        ["50", "0", "200"],
    ),
    (
        "What is the chemical formula of water?",
        "The chemical formula of water is {}.",
        "H2O",
        ["CO2", "NaCl", "O3"],
    ),
    (
        "Which star is closest to the Earth?",
        "The star closest to the Earth is {}.",
        "the Sun",
        ["the Moon", "Mars", "Polaris"],
    ),
    ("How many legs does a spider have?", "A spider has {} legs.", "eight", ["six", "four", "ten"]),
    (
        "What is the tallest animal?",
        "The tallest animal is the {}.",
        "giraffe",
        ["mouse", "cat", "snail"],
    ),
    (
        "What do cows give us to drink?",
        "Cows give us {} to drink.",
        "milk",
        ["juice", "coffee", "oil"],
    ),
    (
        "Which organ pumps blood through the body?",
        "The {} pumps blood through the body.",
        "heart",
        ["lungs", "stomach", "skin"],
    ),
    (
        "Which season is the coldest?",
        "The coldest season is {}.",
        "winter",
        ["summer", "spring", "autumn"],
    ),
    (
        "What do we call a baby cat?",
        "A baby cat is called a {}.",
        "kitten",
        ["puppy", "calf", "foal"],
    ),
    ("Which animal lays eggs?", "The {} lays eggs.", "chicken", ["dog", "cat", "horse"]),
    (
        "What do we breathe in to live?",
        "We breathe in {} to live.",
        "oxygen",
        ["smoke", "water", "sand"],
    ),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

FACT_ANSWERS = [
    ("Which planet do we live on?", "We live on the planet Earth."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What do plants need to grow?", "Plants need sunlight, water and air to grow."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius."),
    ("What color is a ripe banana?", "A ripe banana is yellow."),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong was the first person to walk on the Moon.",
    ),
    ("What is the largest mammal?", "The blue whale is the largest mammal."),
    ("What language is mainly spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("What is the Sun?", "The Sun is a star."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Which instrument has black and white keys?", "The piano has black and white keys."),
    ("What do we call a baby dog?", "A baby dog is called a puppy."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("Where do fish live?", "Fish live in water."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("What do we use to see?", "We use our eyes to see."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe."),
    ("Which animal is known for its long trunk?", "The elephant is known for its long trunk."),
    ("What is the color of snow?", "Snow is white."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
]

WORDS = [
    "apple",
    "river",
    "garden",
    "window",
    "music",
    "orange",
    "pencil",
    "summer",
    "tiger",
    "bread",
    "silver",
    "doctor",
    "forest",
    "planet",
    "candle",
    "rabbit",
    "yellow",
    "basket",
    "winter",
    "castle",
]

PLURALS = {
    "cat": "cats",
    "dog": "dogs",
    "box": "boxes",
    "bus": "buses",
    "child": "children",
    "mouse": "mice",
    "man": "men",
    "woman": "women",
    "foot": "feet",
    "tooth": "teeth",
    "city": "cities",
    "baby": "babies",
    "knife": "knives",
    "leaf": "leaves",
    "tree": "trees",
    "book": "books",
    "glass": "glasses",
    "church": "churches",
    "sheep": "sheep",
    "person": "people",
    "story": "stories",
    "apple": "apples",
}

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


# ---------------------------------------------------------------------------------------------
# Item families: each takes a Random and returns (prompt, answer, distractors); distractors are
# None for held-out answer items.

Item = tuple[str, str, list[str] | None]


def _arithmetic(rng: random.Random) -> Item:
    op = rng.choice(["+", "-", "times"])
    if op == "+":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        answer = a + b
    elif op == "-":
        a = rng.randint(5, 30)
        b = rng.randint(1, a - 1)
        answer = a - b
    else:
        a, b = rng.randint(2, 10), rng.randint(2, 10)
        answer = a * b
    near = [answer + d for d in (-10, -2, -1, 1, 2, 10) if answer + d > 0]
    return _cloze(
        f"What is {a} {op} {b}?",
        f"{a} {op} {b} is {{}}.",
        str(answer),
        map(str, rng.sample(near, 3)),
    )


def _capital(rng: random.Random) -> Item:
    country = rng.choice(sorted(CAPITALS))
    others = [c for k, c in sorted(CAPITALS.items()) if k != country]
    reply = f"The capital of {country} is {{}}."
    return _cloze(
        f"What is the capital of {country}?", reply, CAPITALS[country], rng.sample(others, 3)
    )


def _antonym(rng: random.Random) -> Item:
    word = rng.choice(sorted(ANTONYMS))
    others = [a for w, a in sorted(ANTONYMS.items()) if w != word]
    reply = f'The opposite of "{word}" is "{{}}".'
    return _cloze(
        f'What is the opposite of "{word}"?', reply, ANTONYMS[word], rng.sample(others, 3)
    )


def _category(rng: random.Random) -> Item:
    category, *other_categories = rng.sample(sorted(CATEGORIES), 4)
    answer = rng.choice(CATEGORIES[category])
    distractors = [rng.choice(CATEGORIES[c]) for c in other_categories]
    listed = ", ".join(rng.sample([answer, *distractors], 4))
    return _cloze(f"Which of these is {category}: {listed}?", "The {}.", answer, distractors)


def _units(rng: random.Random) -> Item:
    return _cloze(*rng.choice(UNIT_FACTS))


def _order(rng: random.Random) -> Item:
    # Only "after": SmolLM2-135M picks the following day for "before" questions every time.
    kind, seq = rng.choice([("day", DAYS), ("month", MONTHS)])
    i = rng.randrange(len(seq))
    answer, wrong_way = seq[(i + 1) % len(seq)], seq[i - 1]
    rest = [s for s in seq if s not in (answer, wrong_way, seq[i])]
    reply = f"The {kind} after {seq[i]} is {{}}."
    return _cloze(
        f"What {kind} comes after {seq[i]}?", reply, answer, [wrong_way, *rng.sample(rest, 2)]
    )


def _general(rng: random.Random) -> Item:
    return _cloze(*rng.choice(GENERAL_FACTS))


def _cloze(prompt: str, reply: str, answer: str, distractors: Iterable[str]) -> Item:
    """A multiple-choice item whose candidates are the same full reply with different answers:
    a small LM rates a bare word as an unlikely reply, so bare-word scores are mostly noise."""
    return (
        prompt,
        _sentence(reply.format(answer)),
        [_sentence(reply.format(d)) for d in distractors],
    )


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _fact_answer(rng: random.Random) -> Item:
    question, answer = rng.choice(FACT_ANSWERS)
    return question, answer, None


def _uppercase(rng: random.Random) -> Item:
    word = rng.choice(WORDS)
    return f'Write the word "{word}" in capital letters.', word.upper(), None


def _sort_numbers(rng: random.Random) -> Item:
    numbers = rng.sample(range(1, 50), rng.randint(3, 5))
    listed = ", ".join(map(str, numbers))
    return (
        f"Sort these numbers from smallest to largest: {listed}.",
        ", ".join(map(str, sorted(numbers))),
        None,
    )


def _plural(rng: random.Random) -> Item:
    word = rng.choice(sorted(PLURALS))
    return f'What is the plural of "{word}"?', f'The plural of "{word}" is "{PLURALS[word]}".', None


def _number_words(rng: random.Random) -> Item:
    n = rng.randint(1, 99)
    return f"Write the number {n} in words.", number_in_words(n), None


def number_in_words(n: int) -> str:
    """English words for 0..99, e.g. 42 -> "forty-two"."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


MC_FAMILIES: dict[str, Callable[[random.Random], Item]] = {
    "arithmetic": _arithmetic,
    "capital": _capital,
    "antonym": _antonym,
    "category": _category,
    "units": _units,
    "order": _order,
    "general": _general,
}
PPL_FAMILIES: dict[str, Callable[[random.Random], Item]] = {
    "fact_answer": _fact_answer,
    "uppercase": _uppercase,
    "sort_numbers": _sort_numbers,
    "plural": _plural,
    "number_words": _number_words,
}
MC_SHARE = 0.6
"""Share of multiple-choice items in a built set; the rest are held-out answers."""


# ---------------------------------------------------------------------------------------------
# Building and storing the set


def build_text_set(n_items: int, seed: int) -> list[dict]:
    """`n_items` text items (60% multiple choice), families in turn; the same seed, the same set.

    Each item is `{"id", "type": "mc" | "ppl", "family", "prompt", "answer"}` plus `"options"`
    (four candidates in random order, the answer among them) for multiple choice. Prompts do
    not repeat while a family still has unused ones.
    """
    rng = random.Random(seed)
    n_mc = round(n_items * MC_SHARE)
    plan = [("mc", f) for f in _round_robin(list(MC_FAMILIES), n_mc)]
    plan += [("ppl", f) for f in _round_robin(list(PPL_FAMILIES), n_items - n_mc)]
    seen: set[str] = set()
    items = []
    for i, (kind, family) in enumerate(plan):
        make = (MC_FAMILIES if kind == "mc" else PPL_FAMILIES)[family]
        prompt, answer, distractors = _draw_unseen(make, rng, seen)
        item = {"id": f"text-{i:04d}", "type": kind, "family": family, "prompt": prompt}
        if distractors is not None:
            item["options"] = rng.sample([answer, *distractors], len(distractors) + 1)
        item["answer"] = answer
        items.append(item)
    return items


def _round_robin(families: list[str], n: int) -> list[str]:
    return [families[i % len(families)] for i in range(n)]


def _draw_unseen(make: Callable[[random.Random], Item], rng: random.Random, seen: set[str]) -> Item:
    """A new prompt of the family if one turns up within a few draws, else a repeat."""
    for _ in range(50):
        item = make(rng)
        if item[0] not in seen:
            break
    seen.add(item[0])
    return item


def write_text_set(path: str | Path, items: Sequence[dict]) -> None:
    """Write items as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def read_text_set(path: str | Path) -> list[dict]:
    """Read items written by `write_text_set`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
