"""Synthetic contexts with checkable content: a user memory of N facts or a registry of N tools, and probe
questions whose right answer is in the context (plus unrelated questions, for the gate's routing rate).

``python -m prism_lightning.contexts.fixtures memory --n 12 --out DIR`` writes ``DIR/memory.txt`` and
``DIR/probes.jsonl``; ``tools`` writes ``DIR/tools.json`` and ``DIR/probes.jsonl``. The same seed gives the same
files. Each probe has ``choices`` (the right one at ``answer``, the others the same slot's other values), so
accuracy is read from likelihoods alone, judge-free; chance is 1 / len(choices).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

# (fact template, question, answer template, values): every value of a slot is a wrong choice for the others.
MEMORY_SLOTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("The user's dog is called {v}.", "What is my dog called?", "Your dog is called {v}.",
     ("Biscuit", "Pepper", "Juniper", "Waffles", "Ziggy", "Marlowe")),
    ("The user lives in {v}.", "Which city do I live in?", "You live in {v}.",
     ("Lisbon", "Tampere", "Valparaiso", "Ljubljana", "Hobart", "Trieste")),
    ("The user works as a {v}.", "What do I do for a living?", "You work as a {v}.",
     ("glassblower", "hydrologist", "court stenographer", "beekeeper", "tram driver", "luthier")),
    ("The user is allergic to {v}.", "What am I allergic to?", "You are allergic to {v}.",
     ("hazelnuts", "penicillin", "sesame", "shellfish", "latex", "kiwi")),
    ("The user's sister is named {v}.", "What is my sister's name?", "Your sister is named {v}.",
     ("Ottilie", "Marisol", "Freya", "Anouk", "Delphine", "Ingrid")),
    ("The user drives a {v}.", "What car do I drive?", "You drive a {v}.",
     ("green Volvo estate", "red Fiat Panda", "white Toyota Prius", "blue Skoda Octavia", "black Saab 900",
      "yellow Renault Zoe")),
    ("The user's favourite composer is {v}.", "Who is my favourite composer?", "Your favourite composer is {v}.",
     ("Sibelius", "Hildegard von Bingen", "Satie", "Janacek", "Rameau", "Ligeti")),
    ("The user plays the {v}.", "Which instrument do I play?", "You play the {v}.",
     ("cello", "bassoon", "harp", "accordion", "oboe", "theremin")),
    ("The user's flat is on the {v} floor.", "Which floor is my flat on?", "Your flat is on the {v} floor.",
     ("third", "seventh", "ninth", "second", "eleventh", "fifth")),
    ("The user is training for a {v}.", "What am I training for?", "You are training for a {v}.",
     ("half marathon", "triathlon", "100 km cycling race", "rowing regatta", "mountain ultra", "swim across a lake")),
    ("The user's partner is called {v}.", "What is my partner called?", "Your partner is called {v}.",
     ("Teodor", "Priya", "Casimir", "Leontine", "Rafferty", "Noor")),
    ("The user is learning {v}.", "Which language am I learning?", "You are learning {v}.",
     ("Icelandic", "Basque", "Tagalog", "Welsh", "Georgian", "Swahili")),
    ("The user's birthday is in {v}.", "In which month is my birthday?", "Your birthday is in {v}.",
     ("February", "April", "July", "September", "October", "December")),
    ("The user keeps {v} as a hobby.", "What do I keep as a hobby?", "You keep {v} as a hobby.",
     ("bonsai trees", "carnivorous plants", "homing pigeons", "sourdough starters", "vintage radios", "axolotls")),
    ("The user's employer is {v}.", "Who is my employer?", "Your employer is {v}.",
     ("Nordlicht Logistics", "Cobalt Dental", "Fennimore & Sons", "Quarry Lane Press", "Helix Aeroworks",
      "Tidewater Foods")),
    ("The user prefers {v} units.", "Which units do I prefer?", "You prefer {v} units.",
     ("metric", "imperial", "nautical", "astronomical", "SI base", "US customary")),
)

# (name, description, parameters, a request that needs it)
TOOLS: tuple[tuple[str, str, dict, str], ...] = (
    ("convert_currency", "Convert an amount of money from one currency to another.",
     {"amount": "number", "from": "string", "to": "string"}, "How much is 250 Swiss francs in Japanese yen?"),
    ("get_weather", "Current weather and a 3-day forecast for a city.", {"city": "string"},
     "Will it rain in Bergen on Thursday?"),
    ("send_email", "Send an email to a recipient with a subject and body.",
     {"to": "string", "subject": "string", "body": "string"},
     "Email Dana that the meeting moved to 3 pm, subject 'Meeting time'."),
    ("create_calendar_event", "Add an event to the user's calendar.",
     {"title": "string", "start": "datetime", "duration_minutes": "integer"},
     "Put a dentist appointment in my calendar for next Tuesday at 9."),
    ("search_flights", "Search flights between two airports on a date.",
     {"origin": "string", "destination": "string", "date": "date"},
     "Find me flights from Oslo to Madrid on 14 March."),
    ("translate_text", "Translate text into a target language.", {"text": "string", "target_language": "string"},
     "Say 'where is the train station' in Portuguese."),
    ("set_timer", "Start a countdown timer.", {"minutes": "integer", "label": "string"},
     "Remind me in 12 minutes to take the bread out of the oven."),
    ("get_stock_price", "Latest trading price of a stock ticker.", {"ticker": "string"},
     "What is Nvidia trading at right now?"),
    ("find_restaurants", "Find restaurants near a place, filtered by cuisine.",
     {"near": "string", "cuisine": "string"}, "Any good Ethiopian places near Alexanderplatz?"),
    ("calculate_route", "Driving or walking route and travel time between two places.",
     {"from": "string", "to": "string", "mode": "string"}, "How long does it take to walk from the Louvre to the Eiffel Tower?"),
    ("lookup_definition", "Dictionary definition of a word.", {"word": "string"}, "What does 'sesquipedalian' mean?"),
    ("order_groceries", "Add items to the user's grocery order.", {"items": "list[string]"},
     "Add oat milk, eggs and two lemons to my groceries."),
    ("play_music", "Play a song, album or playlist.", {"query": "string"}, "Put on some Nina Simone."),
    ("book_taxi", "Book a taxi from a pickup point to a destination.", {"pickup": "string", "destination": "string"},
     "Get me a cab from home to the airport."),
    ("track_package", "Delivery status of a parcel by tracking number.", {"tracking_number": "string"},
     "Where is my parcel 1Z999AA10123456784?"),
    ("get_news", "Latest headlines on a topic.", {"topic": "string"}, "What's the latest on the Mars sample return?"),
)

# Questions neither a memory nor a tool registry helps with: the gate should stay closed on them.
UNRELATED = (
    "Why is the sky blue?", "How many bones are in the adult human body?", "What causes the seasons on Earth?",
    "Who wrote Pride and Prejudice?", "How do vaccines train the immune system?", "What is a prime number?",
    "Explain photosynthesis in two sentences.", "What is the capital of Canada?",
    "How does a refrigerator keep food cold?", "What is the difference between weather and climate?",
    "Why do cats purr?", "What is the boiling point of water at sea level?", "How do airplanes stay in the air?",
    "What is the Pythagorean theorem?", "Who painted the Mona Lisa?", "What does DNA stand for?",
    "How do tides work?", "What is inflation in economics?", "How many continents are there?",
    "What is the speed of light?", "Why do leaves change colour in autumn?", "What is an atom made of?",
    "How do I boil an egg?", "What is the largest planet in the solar system?",
)


@dataclass(frozen=True)
class Fixture:
    """A context's text, its file name, and its probe rows."""

    filename: str
    text: str
    probes: list[dict]


def memory_fixture(n: int, seed: int = 0) -> Fixture:
    """A memory block of ``n`` facts (n ≤ 16) and one probe per fact."""
    if not 1 <= n <= len(MEMORY_SLOTS):
        raise ValueError(f"memory fixture: n must be 1..{len(MEMORY_SLOTS)}, got {n}")
    rng = random.Random(seed)
    facts, probes = [], []
    for fact, question, answer, values in rng.sample(MEMORY_SLOTS, n):
        value = rng.choice(values)
        facts.append("- " + fact.format(v=value))
        choices = [answer.format(v=v) for v in values]
        probes.append({"question": question, "choices": choices, "answer": values.index(value), "kind": "probe"})
    return Fixture("memory.txt", "\n".join(facts), probes + unrelated_rows())


def tools_fixture(n: int, seed: int = 0) -> Fixture:
    """A registry of ``n`` tools (n ≤ 16) and one probe per tool: a request, and which tool the reply calls."""
    if not 2 <= n <= len(TOOLS):
        raise ValueError(f"tools fixture: n must be 2..{len(TOOLS)}, got {n}")
    tools = random.Random(seed).sample(TOOLS, n)
    schema = [{"name": name, "description": text, "parameters": params} for name, text, params, _ in tools]
    names = [t[0] for t in tools]
    choices = ["<tool_call>{\"name\": \"" + name + "\"" for name in names]
    probes = [{"question": request, "choices": choices, "answer": i, "kind": "probe"}
              for i, (_, _, _, request) in enumerate(tools)]
    return Fixture("tools.json", json.dumps(schema, indent=1), probes + unrelated_rows())


def unrelated_rows() -> list[dict]:
    """Questions the context does not help with (no choices: they measure only the routing rate)."""
    return [{"question": q, "kind": "unrelated"} for q in UNRELATED]


def write_fixture(fixture: Fixture, directory: Path) -> list[Path]:
    """Write the context file and ``probes.jsonl`` into ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    context, probes = directory / fixture.filename, directory / "probes.jsonl"
    context.write_text(fixture.text + "\n", encoding="utf-8")
    probes.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in fixture.probes), encoding="utf-8")
    return [context, probes]


def main(argv: list[str] | None = None) -> None:
    """Command line: write a memory or tools fixture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("memory", "tools"))
    parser.add_argument("--n", type=int, default=12, help="facts or tools")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    make = memory_fixture if args.kind == "memory" else tools_fixture
    for path in write_fixture(make(args.n, args.seed), args.out):
        print(path)


if __name__ == "__main__":
    main()
