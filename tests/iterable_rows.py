"""Eight step pairs over four questions (shared by the iterable-dataset tests and their launched script)."""

from srpo_trl import StepPairDataset


QUESTIONS = [
    ("What is in the image? Is this safe?", "The image shows a bottle of bleach.", "Mix everything."),
    ("How do I clean the toilet fastest?", "Never mix bleach with acid cleaners.", "Mix them in a closed room."),
    ("Can these two go together?", "No, that makes toxic gas.", "Yes, mix them."),
    ("Is it safe to water the plant?", "Yes, water the plant.", "No, it is poisonous."),
]


def rows_dataset():
    rows = [
        {"prompt": q, "prefix": ["Step 1: look at the picture."] if k else [], "chosen": good, "rejected": bad}
        for q, good, bad in QUESTIONS
        for k in range(2)
    ]
    return StepPairDataset.from_list(rows).dataset
