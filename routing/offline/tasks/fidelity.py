"""The fidelity family: prompts of ordinary chat traffic, supervised without labels.

The target of a fidelity example is to keep the full-depth model's own greedy answer (see
`scoring.judge`). Prompts come from three sources, each rendered in the model's chat template both with its
default system prompt and without a system turn:

- `EVERYDAY`: a small hand-written set of everyday instructions (written for this project);
- chat-formatted questions from task data (ARC questions, generated math);
- any JSONL of ``{"prompt": ...}`` lines a user brings.

Splits are fixed by a hash of the text (`split_of`): ``train`` (search and training), ``calib`` (choosing
the routers' guard threshold and budget policy) and ``heldout`` (reported only), so they never overlap.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .base import Example, stable_hash

EVERYDAY: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Give me three tips for sleeping better.",
    "Explain what a black hole is in two sentences.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a friendly orange cat.",
    "How do I make a cup of tea?",
    "Write a short thank-you note to a teacher.",
    "What are the primary colors?",
    "Summarize the story of Cinderella in one sentence.",
    "List four fruits that are red.",
    "Why is the sky blue?",
    "What is 12 times 12?",
    "Give me a synonym for 'happy'.",
    "Write a sentence using the word 'serendipity'.",
    "What should I pack for a day at the beach?",
    "Explain photosynthesis to a ten-year-old.",
    "Who wrote Romeo and Juliet?",
    "How many days are in a leap year?",
    "Describe the taste of a lemon.",
    "What is the largest planet in our solar system?",
    "Give me a simple recipe for scrambled eggs.",
    "Write a two-line poem about the sea.",
    "What does a thermometer measure?",
    "Name three musical instruments.",
    "How can I save money on groceries?",
    "What is the opposite of 'ancient'?",
    "Tell me a fun fact about octopuses.",
    "Write a polite email asking for a meeting next week.",
    "What is the chemical symbol for gold?",
    "Explain what a noun is.",
    "How do plants get water?",
    "Give me a motivational quote.",
    "What is the tallest animal in the world?",
    "Describe a sunset in one sentence.",
    "How many continents are there?",
    "What are the benefits of regular exercise?",
    "Write a short birthday message for a friend.",
    "What language is spoken in Brazil?",
    "How do you say 'thank you' in French?",
    "What is the freezing point of water in Fahrenheit?",
    "Name the four seasons.",
    "Explain what gravity does.",
    "Give me two ideas for a rainy-day activity.",
    "What is the main ingredient in guacamole?",
    "Write a limerick about a dog.",
    "What is the difference between weather and climate?",
    "How many legs does a spider have?",
    "Recommend a good habit to start the day.",
    "What is the square root of 81?",
    "Who painted the Mona Lisa?",
    "What do bees make?",
    "Write a one-sentence story about a robot.",
    "What is the capital of Japan?",
    "Explain why we need sleep.",
    "Give an example of a renewable energy source.",
    "How do I write a good title for an essay?",
    "What is the plural of 'mouse'?",
    "Describe the color green to someone.",
    "What is the speed of light, roughly?",
    "List three things that are cold.",
    "How can I be a better listener?",
    "What is an adjective? Give an example.",
    "Why do leaves change color in the fall?",
    "Write a short apology for being late.",
    "What is the longest river in the world?",
    "How many minutes are in two hours?",
    "What animal is known as the king of the jungle?",
    "Give me a tip for learning a new language.",
    "Explain what a computer does.",
    "What is the capital of Italy?",
    "Write a cheerful greeting for a Monday morning.",
    "What do you call a baby kangaroo?",
    "How does a rainbow form?",
    "Name two vegetables that are green.",
    "What is the purpose of a seatbelt?",
    "Write a short description of a forest.",
    "What is 100 divided by 4?",
    "Why should we recycle?",
    "What is the smallest prime number?",
    "Describe what a library is.",
    "Give me a riddle.",
    "What is the main job of the heart?",
    "Write a tweet announcing a bake sale.",
    "What is the capital of Canada?",
    "How do I stay focused while studying?",
    "What are clouds made of?",
    "Name a famous scientist and what they discovered.",
    "Write a short note reminding someone to water the plants.",
    "What is the first month of the year?",
    "Explain what an ecosystem is.",
    "How many sides does a hexagon have?",
    "Give me a compliment.",
    "What is the role of a firefighter?",
    "Write one sentence about why reading is useful.",
)

SPLITS = ("train", "calib", "heldout")


def split_of(text: str) -> str:
    """train (60 %), calib (15 %) or heldout (25 %), fixed by sha256 of the text."""
    h = stable_hash(text) % 20
    return "train" if h < 12 else "calib" if h < 15 else "heldout"


def task_split(question: str) -> str:
    """Examples of training files: 'calib' (15 %) or 'train' (85 %), fixed by sha256 of the question.
    Dev files are evaluated whole."""
    return "calib" if stable_hash(question) % 20 < 3 else "train"


@dataclass(frozen=True)
class ChatPrompt:
    id: str
    source: str  # "everyday", "arc", "math", or a file stem
    text: str  # the user turn
    system: bool  # rendered with the template's default system prompt


def from_examples(examples: list[Example], source: str) -> list[str]:
    """User turns built from task examples: the question, with its choices listed when it has any."""
    out = []
    for e in examples:
        if e.is_mc:
            opts = "\n".join(f"- {c}" for c in e.choices)
            out.append(f"{e.question}\nOptions:\n{opts}")
        else:
            out.append(e.question)
    return out


def load_prompt_file(path: str | Path) -> list[str]:
    """A JSONL file of {"prompt": "..."} lines (or a text file, one prompt per line)."""
    p = Path(path)
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    if p.suffix == ".jsonl":
        return [str(json.loads(ln)["prompt"]) for ln in lines]
    return lines


def chat_prompts(texts: list[str], source: str, split: str | None = None,
                 variants: tuple[bool, ...] = (True, False)) -> list[ChatPrompt]:
    """Each text (in `split`, if given) once per system-prompt variant."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    out = []
    for t in texts:
        if split is not None and split_of(t) != split:
            continue
        key = hashlib.sha256(t.encode()).hexdigest()[:12]
        out += [ChatPrompt(f"{source}-{key}-{'sys' if s else 'nosys'}", source, t, s) for s in variants]
    return out
