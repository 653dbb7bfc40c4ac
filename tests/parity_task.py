"""A task a random model 'solves' about half the time (answer = parity of the output length),
so tiny end-to-end runs get trees with both positive and negative leaves."""

from malt_jax.tasks import Example, LoadResult, Task, default_prompts


class ParityTask(Task):
    name = "parity"
    strict_rewards = False  # the answer is the text's length: no Final Answer line to require

    def __init__(self):
        super().__init__()
        self.prompts = default_prompts("synthetic")

    def _load(self, split):
        return LoadResult(
            [Example(id=f"{split}-{i}", question=f"Question number {i}?", answer="even") for i in range(12)]
        )

    def extract(self, text):
        return "even" if len(text) % 2 == 0 else "odd"

    def grade(self, text, gold):
        return int(self.extract(text) == gold)

    def grade_key(self, key, example):
        return int(key == example.answer)  # the key is the parity itself, not an answer a text states
