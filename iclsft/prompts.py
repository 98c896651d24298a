"""Prompts as token ids (SPEC §4).

Every piece is tokenized on its own and the ids are concatenated: the prefix ids are then
identical for every query, the prompt at K is a token prefix of the prompt at K' > K, and an SFT
training example is exactly an exemplar of the ICL prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from iclsft.spec import TemplateSpec


class PromptBuilder:
    """Renders exemplars and queries of one template and label pair into token ids."""

    def __init__(self, tokenizer, template: TemplateSpec, labels: Sequence[str], values: Sequence[str] | None = None):
        """`values`: how the integers 0..99 are written (the semantic task's words); None: as numbers."""
        self.tokenizer = tokenizer
        self.template = template
        self.labels = tuple(labels)
        self.values = tuple(values) if values is not None else None
        self.bos = self._bos_ids()
        self.header = self._encode(template.header)
        self.separator = self._encode(template.separator)
        self.label_ids = [self._encode(label) for label in self.labels]
        check_labels(self.labels, self.label_ids)
        self._query_cache: dict[tuple[int, int], list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _bos_ids(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        mode = self.template.bos
        if mode == "never":
            return []
        if mode == "always":
            if bos is None:
                raise ValueError("template bos='always' but this tokenizer has no BOS token")
            return [bos]
        # auto: do what the tokenizer does by default
        probe = self.tokenizer("1", add_special_tokens=True)["input_ids"]
        return [bos] if bos is not None and probe and probe[0] == bos else []

    def start(self) -> list[int]:
        """What every sequence starts with: at most one BOS, then the header."""
        return self.bos + self.header

    def query(self, n1: int, n2: int) -> list[int]:
        key = (int(n1), int(n2))
        ids = self._query_cache.get(key)
        if ids is None:
            x1, x2 = (self.values[key[0]], self.values[key[1]]) if self.values else key
            ids = self._encode(self.template.query.format(x1=x1, x2=x2))
            if not ids:
                raise ValueError(f"query template {self.template.query!r} renders to no tokens")
            self._query_cache[key] = ids
        return ids

    def queries(self, n1: Sequence[int], n2: Sequence[int]) -> list[list[int]]:
        return [self.query(a, b) for a, b in zip(n1, n2)]

    def exemplar(self, n1: int, n2: int, label: int) -> list[int]:
        """Query, label tokens, separator: the same ids in an ICL prompt and an SFT example."""
        return self.query(n1, n2) + self.label_ids[label] + self.separator

    def prefix(self, n1: Sequence[int], n2: Sequence[int], label: Sequence[int]) -> list[int]:
        """The ICL prefix: start, then every exemplar in stream order."""
        ids = self.start()
        for a, b, y in zip(n1, n2, label):
            ids += self.exemplar(a, b, y)
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids.count(bos) > 1:
            raise ValueError(f"the prompt holds {ids.count(bos)} BOS tokens (at most one is allowed); check the header")
        return ids

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def check_labels(labels: Sequence[str], label_ids: Sequence[Sequence[int]]) -> None:
    """Labels must tokenize to non-empty sequences, none a prefix of another.

    If one label's tokens were a prefix of the other's, "the first label" would also be the start
    of the second, and their probabilities would not be those of two exclusive answers.
    """
    for label, ids in zip(labels, label_ids):
        if not ids:
            raise ValueError(f"label {label!r} tokenizes to no tokens")
    for i, a in enumerate(label_ids):
        for j, b in enumerate(label_ids):
            if i != j and len(a) <= len(b) and list(b[: len(a)]) == list(a):
                raise ValueError(
                    f"labels {labels[i]!r} and {labels[j]!r} are ambiguous for this tokenizer: the tokens of "
                    f"{labels[i]!r} {list(a)} are a prefix of those of {labels[j]!r} {list(b)}; "
                    "choose labels whose token sequences differ before either ends"
                )


def builder_for(tokenizer, template: TemplateSpec, task) -> PromptBuilder:
    """The builder of a task's prompts: its labels and how it writes n1 and n2."""
    from iclsft.tasks import linear2d

    return PromptBuilder(tokenizer, template, task.labels, linear2d.values(task))


def builder_key(task) -> tuple:
    """Tasks with the same key share a builder."""
    return (task.labels, task.words if task.name == "semantic" else None)


def prompt_builders(tokenizer, template: TemplateSpec, tasks) -> dict[tuple, PromptBuilder]:
    """One builder per distinct way the tasks write prompts, keyed by `builder_key(task)`."""
    return {builder_key(t): builder_for(tokenizer, template, t) for t in tasks}
