"""Generate a 10-class classification task of short chat rows: which department should handle a customer
message. Each message is built from a class's own phrases mixed with shared filler, so no single word gives the
class away every time; one right label per row (exact match); test messages use phrasings that training rows
never show. Seeded; writes data/classify/{train,test}.jsonl
(1,200 and 200 `messages` rows). Run: python scripts/make_classify_data.py
"""
import json
import random
from pathlib import Path

CLASSES = {
    "billing": ["I was charged twice", "my invoice shows the wrong amount", "a refund has not arrived",
                "the monthly fee went up", "my card was declined at checkout", "I need a copy of last month's bill"],
    "shipping": ["my parcel has not arrived", "the tracking number does not work", "the box came damaged",
                 "delivery was sent to the wrong address", "the courier never showed up", "it is stuck in customs"],
    "returns": ["I want to send this back", "the item does not fit", "how do I get a return label",
                "I changed my mind about the order", "can I exchange it for another size", "the return window closed"],
    "account": ["I cannot log in", "please reset my password", "I want to change my email address",
                "my account was locked", "two-factor codes never come", "delete my profile please"],
    "technical": ["the app crashes on start", "the page shows an error 500", "sync stopped working",
                  "the update broke the settings screen", "the device will not pair", "it freezes after a minute"],
    "sales": ["do you offer a discount for teams", "I want to upgrade my plan", "is there a yearly price",
              "can I get a quote for fifty seats", "what does the premium tier include", "I would like a demo"],
    "privacy": ["what data do you keep about me", "I want a copy of my personal data", "stop sharing my details",
                "who can see my history", "remove me from your mailing list", "is my data sold to others"],
    "feedback": ["I love the new design", "the last update is great", "you should add a dark mode",
                 "your support agent was wonderful", "the search could be faster", "just wanted to say thanks"],
    "legal": ["I need your terms of service in writing", "this breaks the contract we signed",
              "my lawyer will contact you", "is this product compliant with local law", "I want to file a complaint",
              "send me the licence agreement"],
    "careers": ["are you hiring engineers", "I applied for a job last week", "can I do an internship",
                "what is the interview process", "I want to work at your company", "do you hire remote staff"],
}
OPENERS = ["Hi,", "Hello there.", "Good morning!", "Hey team,", "Excuse me,", "", "Quick question:", "Dear support,"]
FILLER = ["It has been a long week.", "I use your service every day.", "Please answer soon.", "Thanks in advance.",
          "This is my second message about it.", "My order number is {n}.", "I am writing from my phone.", ""]
INSTRUCTION = ("Route this customer message to one department: " + ", ".join(CLASSES) +
               ". Reply with the department name only.\n\nMessage: ")


def row(rng: random.Random, held_out: bool) -> dict:
    """Training rows use each class's first four phrases, test rows the other two: the test asks for the
    department of messages worded in ways the adapter has not seen."""
    label = rng.choice(list(CLASSES))
    phrases = CLASSES[label][4:] if held_out else CLASSES[label][:4]
    parts = [rng.choice(OPENERS), rng.choice(phrases) + rng.choice([".", "!", "?", ""]),
             rng.choice(FILLER).format(n=rng.randint(10000, 99999))]
    rng.shuffle(parts[1:]) if rng.random() < 0.3 else None
    msg = " ".join(p for p in parts if p)
    return {"messages": [{"role": "user", "content": INSTRUCTION + msg}, {"role": "assistant", "content": label}]}


def main() -> None:
    rng = random.Random(20261129)
    out = Path(__file__).resolve().parents[1] / "data" / "classify"
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 1200), ("test", 200)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row(rng, name == "test")) + "\n" for _ in range(n)))


if __name__ == "__main__":
    main()
