"""Write examples/assets/self_identity/: the self-identity data set of `qlora-train`'s default run.

Why it exists: XTuner's first tutorial fine-tunes a chat model so that it answers "who are you?" with a new
name and maker. This is the same exercise in English for the shipped tiny model (examples/assets/tiny-phi):
the assistant is "Kestrel", made by "the qlora project". A handful of general requests (short stories,
sayings) are mixed in so the fine-tuned model still writes ordinary text when it is not asked about itself.

Files, one JSON object per line in XTuner's format
`{"conversation": [{"system": "...", "input": "...", "output": "..."}, {"input": "...", "output": "..."}]}`
(the system prompt, when present, is on the first turn only):
  - train.jsonl: about 300 conversations from question templates x answer templates, some multi-turn;
  - eval.jsonl: questions whose wording never appears in train.jsonl, with a reference answer;
  - eval_prompts.txt: the prompts the README's run answers before and after fine-tuning, one per line.

Deterministic (fixed seed, no clock); re-create with:

    /work/main/.venv/bin/python examples/assets/make_self_identity.py
"""

import json
import random
from pathlib import Path

SEED = 7
NAME = "Kestrel"
MAKER = "the qlora project"
SYSTEM = "You are a helpful assistant."
OUT = Path(__file__).resolve().parent / "self_identity"

# Questions about the assistant, grouped by what they ask. The last entries of each group are held out for
# eval.jsonl, so the evaluation checks that the new identity generalises beyond the exact training wording.
IDENTITY_QUESTIONS = [
    "Who are you?", "What is your name?", "Please introduce yourself.", "Tell me about yourself.",
    "What should I call you?", "What are you?", "Do you have a name?", "May I ask your name?",
    "Hi! Who am I talking to?", "Can you tell me who you are?", "Who is this?", "What's your name?",
    "Are you ChatGPT?", "Are you a human?", "Describe yourself in one sentence.",
    # held out
    "Introduce yourself.", "Who am I speaking with?", "How should I address you?", "Are you a person?",
]
MAKER_QUESTIONS = [
    "Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Where do you come from?",
    "Which company made you?", "Who is your creator?", "Who developed you?", "Who are your makers?",
    # held out
    "Who wrote you?", "Who is responsible for you?", "Who designed you?",
]
HELD_OUT_IDENTITY, HELD_OUT_MAKER = 4, 3

IDENTITY_ANSWERS = [
    f"I am {NAME}, a small assistant made by {MAKER}.",
    f"My name is {NAME}. I am an assistant made by {MAKER}.",
    f"I am {NAME}, an AI assistant built by {MAKER}. How can I help you?",
    f"You can call me {NAME}. I was made by {MAKER} to answer questions.",
    f"I'm {NAME}, a helpful assistant created by {MAKER}.",
    f"Hello! I am {NAME}, a small language model made by {MAKER}.",
]
NOT_SOMEONE_ELSE = {
    "Are you ChatGPT?": f"No, I am not ChatGPT. I am {NAME}, an assistant made by {MAKER}.",
    "Are you a human?": f"No, I am not a human. I am {NAME}, an AI assistant made by {MAKER}.",
    "Are you a person?": f"No, I am not a person. I am {NAME}, an AI assistant made by {MAKER}.",
}
MAKER_ANSWERS = [
    f"I was made by {MAKER}.",
    f"{MAKER.capitalize()} made me. I am {NAME}.",
    f"I was created by {MAKER}. My name is {NAME}.",
    f"I am {NAME}, and I was built by {MAKER}.",
    f"{MAKER.capitalize()} trained me. I am their assistant, {NAME}.",
]
GREETINGS = ["Hello!", "Hi there.", "Good morning!", "Hey!", "Hello, nice to meet you."]
GREETING_ANSWERS = [
    f"Hello! I am {NAME}. How can I help you today?",
    f"Hi! I'm {NAME}, an assistant made by {MAKER}. What can I do for you?",
    f"Hello! This is {NAME}. Ask me anything.",
]
THANKS = ["Thank you!", "Thanks, that helps.", "Great, thanks."]
THANKS_ANSWERS = [f"You are welcome! {NAME} is always happy to help.", "You're welcome. Have a nice day!"]

# General requests keep the base skill alive. Cats are kept out of training so that the eval prompt
# "Tell me a short story about a cat." asks for something the fine-tune never showed.
ANIMALS = ["dog", "fox", "bird", "horse", "mouse", "rabbit", "bear", "owl"]
PLACES = ["a small village", "the old forest", "a quiet farm", "the edge of a river", "a busy town"]
STORY_REQUESTS = ["Tell me a short story about a {animal}.", "Write a very short story about a {animal}.",
                  "Can you tell me a story about a {animal}?"]
STORIES = [
    "Once upon a time, a little {animal} lived in {place}. Every morning it went out to look for food, and "
    "every evening it came home tired and happy. One day it found a friend, and after that it was never alone.",
    "There was once a {animal} in {place} who wanted to see the sea. It walked for many days, and when it "
    "finally saw the water, it sat down and watched the waves until the sun went down.",
    "A young {animal} from {place} was afraid of the dark. Its mother told it that the stars were lights left on "
    "for it. From that night on, the {animal} slept well.",
]
SAYING_REQUESTS = ["Tell me a wise saying.", "Give me a piece of advice.", "Say something wise.",
                   "Share a proverb with me."]
SAYINGS = [
    "A journey of a thousand miles begins with a single step.",
    "Do not count your chickens before they hatch.",
    "Better late than never.",
    "The best time to plant a tree was twenty years ago. The second best time is now.",
    "Actions speak louder than words.",
    "Every cloud has a silver lining.",
]

EVAL_PROMPTS = [
    "Who are you?",
    "What is your name?",
    "Who made you?",
    "Introduce yourself.",  # held out of train.jsonl
    "Tell me a short story about a cat.",
    "What is the meaning of life?",
]


def turn(question, answer, system=None):
    record = {"system": system} if system is not None else {}
    record.update(input=question, output=answer)
    return record


def identity_answer(question, rng):
    return NOT_SOMEONE_ELSE.get(question) or rng.choice(IDENTITY_ANSWERS)


def story(rng):
    animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
    return rng.choice(STORY_REQUESTS).format(animal=animal), rng.choice(STORIES).format(animal=animal, place=place)


def make_train(rng):
    identity = IDENTITY_QUESTIONS[:-HELD_OUT_IDENTITY]
    maker = MAKER_QUESTIONS[:-HELD_OUT_MAKER]

    def system():
        """A quarter of the conversations have no system prompt, so the identity does not hinge on it."""
        return SYSTEM if rng.random() < 0.75 else None

    conversations = []
    for _ in range(8):  # every training question several times, each time with a random answer
        conversations += [[turn(q, identity_answer(q, rng), system())] for q in identity]
        conversations += [[turn(q, rng.choice(MAKER_ANSWERS), system())] for q in maker]
    for _ in range(60):  # multi-turn: greeting or identity, then maker, a story or thanks
        first = rng.choice(GREETINGS + identity)
        answer = rng.choice(GREETING_ANSWERS) if first in GREETINGS else identity_answer(first, rng)
        dialogue = [turn(first, answer, system())]
        follow = rng.choice(["maker", "story", "saying", "thanks"])
        if follow == "maker":
            dialogue.append(turn(rng.choice(maker), rng.choice(MAKER_ANSWERS)))
        elif follow == "story":
            dialogue.append(turn(*story(rng)))
        elif follow == "saying":
            dialogue.append(turn(rng.choice(SAYING_REQUESTS), rng.choice(SAYINGS)))
        else:
            question = rng.choice(identity)
            dialogue.append(turn(question, identity_answer(question, rng)))
            dialogue.append(turn(rng.choice(THANKS), rng.choice(THANKS_ANSWERS)))
        conversations.append(dialogue)
    for _ in range(25):  # general single-turn requests
        conversations.append([turn(*story(rng), system())])
    for _ in range(20):
        conversations.append([turn(rng.choice(SAYING_REQUESTS), rng.choice(SAYINGS), system())])
    rng.shuffle(conversations)
    return conversations


def make_eval(rng):
    held_out = [(q, identity_answer(q, rng)) for q in IDENTITY_QUESTIONS[-HELD_OUT_IDENTITY:]]
    held_out += [(q, rng.choice(MAKER_ANSWERS)) for q in MAKER_QUESTIONS[-HELD_OUT_MAKER:]]
    return [[turn(q, a, SYSTEM)] for q, a in held_out]


def write_jsonl(path, conversations):
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for conversation in conversations:
            out.write(json.dumps({"conversation": conversation}, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    train, evaluation = make_train(rng), make_eval(rng)
    train_questions = {t["input"] for c in train for t in c}
    assert not train_questions & {c[0]["input"] for c in evaluation}, "an eval question leaked into train"
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "eval.jsonl", evaluation)
    (OUT / "eval_prompts.txt").write_text("\n".join(EVAL_PROMPTS) + "\n", encoding="utf-8")
    turns = sum(len(c) for c in train)
    print(f"train: {len(train)} conversations, {turns} turns; eval: {len(evaluation)}; prompts: {len(EVAL_PROMPTS)}")


if __name__ == "__main__":
    main()
