"""Prompts as token ids (SPEC §4; docs/tokenization.md).

A prompt's ids are the tokenizer's own ids for its rendered text (its natural tokenization), for
every tokenizer family, yet built from pieces so that the prefix ids are the same for every query
and the prompt at K is a token prefix of the prompt at K' > K.

Why pieces cannot be tokenized alone: SentencePiece tokenizers with a dummy prefix (Llama-2,
Mistral-7B) put "▁" before the first character of every string they tokenize, and byte-level BPE
writes "\n\n" as one token at the end of a text but as two before a word. So each piece is cut, at
character boundaries (token offsets), out of the ids of a text in which it has its prompt context:
a piece right after the start (`first=True`: the first exemplar, the query at K=0 and of SFT
examples) after the header, a later piece after a rendered exemplar, a separator with a query after
it. A token across a boundary is an error. Labels follow the lm-eval convention: ids(context +
label) minus ids(context). `prefix()` checks itself against the tokenizer on the whole text;
`iclsft.tokenizers_check` checks prefix + query + label at run start.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from iclsft.spec import TemplateSpec
from iclsft.tasks import linear2d

CHAT_SLOT = "@@ICLSFT-USER-TURN@@"  # stands for the user's turn while the chat template is split


class TokenizationError(ValueError):
    """The ids built from pieces are not the tokenizer's ids for the rendered text."""


def cut_ids(tokenizer, texts: Sequence[str], cuts: Sequence[Sequence[int]], hint: str = "") -> list[list[list[int]]]:
    """The tokenizer's ids of each text, cut at that text's character positions `cuts[i]` (sorted) by the
    tokens' offsets: the pieces of a prompt as the tokenizer makes them in their real context. An error
    when a token spans a cut (the pieces could not be shared between prompts); `hint` ends it."""
    try:
        enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise ValueError("prompts need a fast tokenizer (one with a tokenizer.json): this one gives no "
                         "token offsets") from e
    out = []
    for text, at, ids, offsets in zip(texts, cuts, enc["input_ids"], enc["offset_mapping"]):
        parts: list[list[int]] = [[] for _ in range(len(at) + 1)]
        for tok, (s, e) in zip(ids, offsets):
            cut = next((c for c in at if s < c < e), None)
            if cut is not None:
                raise TokenizationError(
                    f"this tokenizer makes one token {tokenizer.convert_ids_to_tokens([tok])} of {text[s:e]!r} "
                    f"across the boundary of two prompt pieces ({text[max(0, cut - 20):cut]!r} | "
                    f"{text[cut:cut + 20]!r}), so the pieces cannot be shared between prompts{hint}")
            parts[bisect.bisect_right(at, s)].append(tok)
        out.append(parts)
    return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where the two sequences differ (the shorter one's length if one is a
    prefix of the other); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def mismatch(tokenizer, got: Sequence[int], want: Sequence[int], got_name: str = "built from pieces",
             want_name: str = "tokenizer on the text", width: int = 4) -> str:
    """One line naming the first differing position and the tokens around it in both sequences."""
    pos = first_difference(got, want)
    if pos is None:
        return "the sequences are equal"
    lo = max(0, pos - width)

    def around(ids: Sequence[int]) -> str:
        return repr(tokenizer.convert_ids_to_tokens(list(ids[lo: pos + width + 1])))

    return (f"first difference at token {pos} of {len(got)} ({got_name}) vs {len(want)} ({want_name}); tokens "
            f"{lo}..: {got_name} {around(got)}, {want_name} {around(want)}")


class PromptBuilder:
    """Renders exemplars and queries of one template and label pair into token ids.

    `first=True` pieces follow the start directly (the first exemplar; the query at K=0 and of SFT
    examples); `first=False` pieces follow an exemplar."""

    def __init__(self, tokenizer, template: TemplateSpec, labels: Sequence[str], values: Sequence[str] | None = None):
        """`values`: how the integers 0..99 are written (the semantic task's words); None: as numbers."""
        self.tokenizer = tokenizer
        self.template = template
        self.labels = tuple(labels)
        self.values = tuple(values) if values is not None else None
        before, self.tail = chat_parts(tokenizer) if template.chat else ("", "")
        self.bos = [] if template.chat else self._bos_ids()  # a chat template writes its own BOS
        self.head = before + template.header  # the text before the first exemplar
        q0, sep = self.query_text(0, 0), template.separator
        # scored labels end the text: what they add to query (+ chat tail), the lm-eval convention
        self.label_ids = [self.continuation(self.head + q0 + self.tail, label) for label in self.labels]
        check_labels(self.labels, self.label_ids)
        # header, shown label and separator as they are inside a prompt, with the next query after them
        # (a separator such as "\n\n" is one token at the end of a text but two before a word)
        h, q = len(self.head), len(self.head) + len(q0)
        inside = [self.split(self.head + q0 + label + sep + q0, [h, q, q + len(label), q + len(label) + len(sep)])
                  for label in self.labels]
        self.header = inside[0][0]
        self.shown_label_ids = [parts[2] for parts in inside]
        self.separators = [parts[3] for parts in inside]
        self.after = self.head + q0 + self.labels[0] + sep  # context of a piece after an exemplar
        self._after_ids = [t for parts in inside[0][:4] for t in parts]
        self._cache: dict[tuple, list[int]] = {}

    @property
    def separator(self) -> list[int]:
        """The separator's ids after an exemplar (the same after either label, else an error)."""
        if any(sep != self.separators[0] for sep in self.separators):
            raise ValueError(f"the separator {self.template.separator!r} is tokenized differently after the labels "
                             f"{self.labels!r}: {self.separators}")
        return self.separators[0]

    # -- text ---------------------------------------------------------------------------------

    def value(self, n: int) -> str:
        return self.values[int(n)] if self.values else str(int(n))

    def query_text(self, n1: int, n2: int) -> str:
        return self.template.query.format(x1=self.value(n1), x2=self.value(n2))

    def exemplar_text(self, n1: int, n2: int, label: int) -> str:
        return self.query_text(n1, n2) + self.labels[label] + self.template.separator

    def prefix_text(self, n1: Sequence[int], n2: Sequence[int], label: Sequence[int]) -> str:
        """The text of `prefix()` (without BOS): what the tokenizer must turn into the same ids."""
        return self.head + "".join(self.exemplar_text(a, b, y) for a, b, y in zip(n1, n2, label))

    def natural(self, text: str) -> list[int]:
        """The tokenizer's ids for `text` with the BOS rule: the reference every prompt must equal."""
        return self.bos + self._encode(text)

    # -- ids ----------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def continuation(self, context: str, text: str) -> list[int]:
        """The ids that `text` adds after `context` (lm-eval convention), the context's ids unchanged."""
        return self.continuations(context, [text])[0]

    def continuations(self, context: str, texts: Sequence[str]) -> list[list[int]]:
        """`continuation` for many texts after one context, in one batched tokenizer call."""
        base = self._encode(context)
        if not texts:
            return []
        full = self.tokenizer([context + t for t in texts], add_special_tokens=False)["input_ids"]
        out = []
        for text, ids in zip(texts, full):
            if list(ids[: len(base)]) != base:
                raise TokenizationError(
                    f"this tokenizer merges {text!r} into the text before it ({context[-30:]!r}), so the piece "
                    "cannot be tokenized on its own: "
                    f"{mismatch(self.tokenizer, list(ids), base, 'context + piece', 'context')}; "
                    "change the template (e.g. end the query or separator with a character the tokenizer keeps apart)"
                )
            out.append(list(ids[len(base):]))
        return out

    def split(self, text: str, cuts: Sequence[int]) -> list[list[int]]:
        """The tokenizer's ids for `text` cut at the character positions `cuts` (by token offsets)."""
        return self.splits([text], cuts)[0]

    def splits(self, texts: Sequence[str], cuts: Sequence[int]) -> list[list[list[int]]]:
        """`split` for many texts at the same cuts; an error when a token spans a cut."""
        return cut_ids(self.tokenizer, texts, [cuts] * len(texts),
                       "; change the template (e.g. a separator or query end the tokenizer keeps apart)")

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
        """What every sequence starts with: at most one BOS, then the header (in chat mode the chat
        template's text before the user's turn, then the header)."""
        return self.bos + self.header

    def _pieces(self, n1: Sequence[int], n2: Sequence[int], first: bool, tail: str) -> list[list[int]]:
        keys = [(int(a), int(b), first, tail) for a, b in zip(n1, n2)]
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if missing:
            context, context_ids = (self.head, self.header) if first else (self.after, self._after_ids)
            texts = [self.query_text(a, b) + tail for a, b, _, _ in missing]
            for key, text, (before, ids) in zip(missing, texts, self.splits([context + t for t in texts],
                                                                            [len(context)])):
                if before != context_ids:
                    raise TokenizationError(
                        f"the text before {text!r} is tokenized differently when the query follows it: "
                        + mismatch(self.tokenizer, before, context_ids, "before this query", "before the first query"))
                if not ids:
                    raise ValueError(f"query template {self.template.query!r} renders {text!r} to no tokens")
                self._cache[key] = ids
        return [self._cache[k] for k in keys]

    def query(self, n1: int, n2: int, first: bool = False) -> list[int]:
        """The query's ids (in chat mode with the end of the user's turn and the assistant's start)."""
        return self._pieces([n1], [n2], first, self.tail)[0]

    def queries(self, n1: Sequence[int], n2: Sequence[int], first: bool = False) -> list[list[int]]:
        return self._pieces(n1, n2, first, self.tail)

    def queries_after(self, prefix: Sequence[int], n1: Sequence[int], n2: Sequence[int]) -> list[list[int]]:
        """The queries as they continue `prefix`: directly after the start when it holds no exemplar."""
        return self.queries(n1, n2, first=list(prefix) == self.start())

    def exemplar(self, n1: int, n2: int, label: int, first: bool = False) -> list[int]:
        """Query, label tokens, separator as they appear in an ICL prompt. Outside chat mode an SFT
        example (`start() + query(first=True)` and the label) is exactly the first exemplar of a prompt."""
        return self._pieces([n1], [n2], first, "")[0] + self.shown_label_ids[label] + self.separators[label]

    def prefix(self, n1: Sequence[int], n2: Sequence[int], label: Sequence[int]) -> list[int]:
        """The ICL prefix: start, then every exemplar in stream order; checked to be the natural
        tokenization of `prefix_text`."""
        ids = self.start()
        for i, (a, b, y) in enumerate(zip(n1, n2, label)):
            ids += self.exemplar(a, b, y, first=i == 0)
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids.count(bos) > 1:
            raise ValueError(f"the prompt holds {ids.count(bos)} BOS tokens (at most one is allowed); check the header")
        # checked with a query after it: a trailing separator may tokenize otherwise at the end of a text
        nxt = self._pieces([0], [0], len(ids) == len(self.start()), "")[0]
        want = self.natural(self.prefix_text(n1, n2, label) + self.query_text(0, 0))
        if ids + nxt != want:
            raise TokenizationError(f"the ICL prefix of {len(list(n1))} exemplars is not the tokenizer's tokenization "
                                    f"of its text: {mismatch(self.tokenizer, ids + nxt, want)}")
        return ids

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def chat_parts(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a single user turn, generation prompt included."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template chat=True needs the model's chat template, but its tokenizer has none "
                         "(no chat_template in tokenizer_config.json); use chat=False for base models")
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_SLOT}], add_generation_prompt=True,
                                         tokenize=False)
    if text.count(CHAT_SLOT) != 1:
        raise ValueError(f"the model's chat template does not place the user's turn verbatim: {text!r}")
    before, after = text.split(CHAT_SLOT)
    return before, after


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
    return PromptBuilder(tokenizer, template, task.labels, linear2d.values(task))


def builder_key(task) -> tuple:
    """Tasks with the same key share a builder."""
    return (task.labels, task.words if task.name == "semantic" else None)


def prompt_builders(tokenizer, template: TemplateSpec, tasks) -> dict[tuple, PromptBuilder]:
    """One builder per distinct way the tasks write prompts, keyed by `builder_key(task)`."""
    return {builder_key(t): builder_for(tokenizer, template, t) for t in tasks}
