"""A synthetic two-skill world that mirrors the paper's setting (SPEC §1, §4), generated from a seed.

Two languages describe one small world of people, things and events:

- **English**, the language the base model mostly knows;
- **the other language** ("L", the paper's zh/ru/es): every English word is mapped by a fixed, seeded bijection to
  an invented word (names, numbers and punctuation are shared, like proper nouns and Arabic numerals in real
  languages), and clauses are verb-final (English "tom finds 4 pens ." is L "tom <4 pens> <finds> .").

Two skills, each learnable from its own data only:

- the **language** skill (the paper's zh chat LoRA): chatting in L about the world -- reading a short L story and
  answering a question about it in L, with no arithmetic anywhere;
- the **task** skill (the paper's math LoRA): English word problems of two steps with a short worked solution that
  writes one equation per step and ends with "the answer is N".

The **composite** task needs both at different tokens: the same problems posed in L and answered with the worked
solution in L -- the equations (digits, + - =: the task skill) and then L's "the answer is" phrase with N as an L
number word (the language skill). This is the regime where LoRA-Flow claims to beat static fusion.

The base model reads L word by word as it reads English (`World.translation_pairs`: each L word's input embedding
is its English word's, an L number word's is its digit's; see `loraflow.demo.training.pretrain_base`), as Llama-2
reads Chinese well enough; L's verb-final order, and writing L, remain the language skill.

Everything is lower case and pre-tokenised (single spaces between words and punctuation), so a word-level
tokenizer built from `World.vocabulary()` round-trips every text exactly. Numbers stay small (operands 1-9,
every intermediate result in 0..MAX_NUMBER) so a tiny model can learn the arithmetic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

MAX_NUMBER = 20  # every number in the world is one token, 0..MAX_NUMBER
MAX_AMOUNT = 5  # what one step of a problem adds or removes: 1..MAX_AMOUNT
STEPS = 2  # steps of a word problem (each one equation of the worked solution)
NAMES = {"tom": "he", "sam": "he", "ben": "he", "leo": "he", "ann": "she", "mia": "she", "eva": "she", "zoe": "she"}
OBJECTS = ("apples", "pens", "coins", "books", "cards", "eggs", "shells", "stamps")
ADD_VERBS = ("finds", "buys")  # the object count goes up
SUB_VERBS = ("loses", "sells")  # the object count goes down
ANIMALS = ("cat", "dog", "bird", "fish")
PLACES = ("garden", "house", "park", "shop", "school")
COLORS = ("red", "blue", "green", "small", "big")
FUNCTION_WORDS = ("has", "have", "the", "a", "is", "in", "to", "of", "likes", "sees", "goes", "counts", "and",
                  "how", "many", "does", "now", "what", "where", "so", "answer", "with", "his", "her", "happens")
PUNCT = (".", ",", "?", "+", "-", "=")
CHAT = ("[INST]", "[/INST]")  # the Llama-2 chat markers (the tokenizer's chat template), as single words
PARALLEL = "<=>"  # joins an English sentence and its L translation in the pretraining text
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, as in loraflow.tiny
INFINITIVE = {"finds": "find", "buys": "buy", "loses": "lose", "sells": "sell",
              "has": "have", "likes": "like", "counts": "count", "goes": "go"}

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
NUCLEI = ["a", "e", "i", "o", "u"]
CODAS = ["", "", "n", "r", "k", "sh"]


@dataclass(frozen=True)
class Clause:
    """One clause: English order is subject verb rest; L order is subject rest verb (verb-final)."""

    subject: tuple[str, ...]
    verb: tuple[str, ...]
    rest: tuple[str, ...] = ()
    end: str = "."


@dataclass(frozen=True)
class Equation:
    """`a op b = c` -- language-neutral, written the same in both languages."""

    a: int
    op: str
    b: int

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    def words(self) -> list[str]:
        return [str(self.a), self.op, str(self.b), "=", str(self.result)]


@dataclass(frozen=True)
class Problem:
    """A word problem: `name` starts with `start` `obj`, then each step (verb, amount) adds or removes some."""

    name: str
    obj: str
    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def equations(self) -> list[Equation]:
        eqs, value = [], self.start
        for verb, amount in self.steps:
            eq = Equation(value, "+" if verb in ADD_VERBS else "-", amount)
            eqs.append(eq)
            value = eq.result
        return eqs

    @property
    def answer(self) -> int:
        return self.equations[-1].result


@dataclass
class World:
    """The vocabulary, the English -> L bijection and every generator, all determined by `seed`."""

    seed: int = 0
    lexicon: dict[str, str] = field(init=False)  # English word -> L word

    def __post_init__(self):
        rng = random.Random(f"loraflow-demo-lexicon-{self.seed}")
        english = sorted(set(self.english_words()))
        taken = set(english) | set(NAMES)
        self.lexicon = {}
        for word in english:
            while True:
                syllables = rng.choice((2, 2, 3))
                invented = "".join(rng.choice(ONSETS) + rng.choice(NUCLEI) for _ in range(syllables))
                invented += rng.choice(CODAS)
                if invented not in taken:
                    break
            taken.add(invented)
            self.lexicon[word] = invented
        # L writes its numbers as words (English writes digits); equations are digits in both languages, as Chinese
        # solutions write Arabic numerals: reading an L question's numbers, and writing the L answer, is L
        self.numerals = {}
        for n in range(MAX_NUMBER + 1):
            while True:
                invented = "".join(rng.choice(ONSETS) + rng.choice(NUCLEI) for _ in range(2)) + rng.choice(CODAS)
                if invented not in taken:
                    break
            taken.add(invented)
            self.numerals[str(n)] = invented
        self.numeral_value = {w: int(n) for n, w in self.numerals.items()}
        # the words before N in "the answer is N ." (L is verb-final: "<the> <answer> N <is> .")
        self.answer_phrase = {lang: self.realize([_answer_clause(0)], lang).split(f" {num}")[0]
                              for lang, num in (("en", "0"), ("xx", self.numerals["0"]))}

    # ------------------------------------------------------------------------------------------- vocabulary
    @staticmethod
    def english_words() -> list[str]:
        """Words that L translates (names, numbers and punctuation are shared between the languages)."""
        return [*OBJECTS, *ADD_VERBS, *SUB_VERBS, *ANIMALS, *PLACES, *COLORS, *FUNCTION_WORDS, *set(NAMES.values()),
                *INFINITIVE.values()]

    def vocabulary(self) -> list[str]:
        """Every token of the world, specials first (ids 0..3 = <unk> <s> </s> <pad>)."""
        words = [*SPECIALS, *CHAT, PARALLEL, *PUNCT, *(str(n) for n in range(MAX_NUMBER + 1)), *NAMES]
        words += sorted(set(self.english_words())) + sorted(self.lexicon.values()) + sorted(self.numerals.values())
        assert len(words) == len(set(words)), "vocabulary collision"
        return words

    def language_of(self, word: str) -> str | None:
        """"en" or "xx" for a translatable word, None for shared words (names, numbers, punctuation)."""
        if word in self.lexicon:
            return "en"
        if word in self._l_words:
            return "xx"
        return None

    @property
    def _l_words(self) -> set[str]:
        return set(self.lexicon.values()) | set(self.numerals.values())

    def translation_pairs(self) -> list[tuple[str, str]]:
        """(English word, L word) for every translated word, and (digit, L number word) for every number."""
        return [*self.lexicon.items(), *self.numerals.items()]

    def l_answer(self, text: str) -> int | None:
        """The composite answer: the value of the last L number word of `text` (None when it has none). A digit
        answer does not count: the question's numbers are L words, and so must the answer be."""
        values = [self.numeral_value[w] for w in text.split() if w in self.numeral_value]
        return values[-1] if values else None

    # ---------------------------------------------------------------------------------------- realisation
    def translate(self, words) -> list[str]:
        return [self.lexicon.get(w, self.numerals.get(w, w)) for w in words]

    def realize(self, parts, lang: str) -> str:
        """Clauses and equations -> one pre-tokenised string in `lang` ("en" or "xx")."""
        out: list[str] = []
        for part in parts:
            if isinstance(part, Equation):
                out += part.words()
            elif lang == "en":
                out += [*part.subject, *part.verb, *part.rest, part.end]
            else:
                out += self.translate([*part.subject, *part.rest, *part.verb]) + [part.end]
        return " ".join(w for w in out if w)

    # ------------------------------------------------------------------------------------------- problems
    def sample_problem(self, rng: random.Random) -> Problem:
        """`STEPS` steps of +/- with amounts 1..MAX_AMOUNT; every intermediate count stays in 0..MAX_NUMBER."""
        while True:
            start = rng.randint(1, 15)
            steps, value = [], start
            for _ in range(STEPS):
                add = rng.random() < 0.5
                amount = rng.randint(1, MAX_AMOUNT)
                value += amount if add else -amount
                steps.append((rng.choice(ADD_VERBS if add else SUB_VERBS), amount))
            if all(0 <= e.result <= MAX_NUMBER for e in Problem("tom", "pens", start, tuple(steps)).equations):
                return Problem(rng.choice(list(NAMES)), rng.choice(OBJECTS), start, tuple(steps))

    def question(self, p: Problem) -> list:
        pron = NAMES[p.name]
        parts = [Clause((p.name,), ("has",), (str(p.start), p.obj))]
        parts += [Clause((pron,), (verb,), (str(n), p.obj)) for verb, n in p.steps]
        parts.append(Clause(("how", "many", p.obj, "does", p.name), ("have", "now"), end="?"))
        return parts

    def solution(self, p: Problem) -> list:
        """The worked solution: one equation per step, then the answer clause (`9 - 3 = 6 . 6 + 2 = 8 . the answer
        is 8 .`). In L only the answer clause is L (`<the> <answer> <eight> <is> .`), so every token of a composite
        answer is one that a single skill writes: the equations the task skill, the L answer phrase and its L number
        word the language skill."""
        parts: list = []
        for eq in p.equations:
            parts += [eq, _END]
        parts.append(_answer_clause(p.answer))
        return parts

    def problem_example(self, rng: random.Random, lang: str) -> dict:
        """{"prompt", "response", "answer", "language"}: a word problem and its worked solution in `lang`."""
        p = self.sample_problem(rng)
        return {"prompt": self.realize(self.question(p), lang),
                "response": self.realize(self.solution(p), lang), "answer": p.answer, "language": lang}

    # ------------------------------------------------------------------------------------ plain sentences
    def plain_clauses(self, rng: random.Random) -> list:
        """A few sentences about one person and one kind of thing (so later sentences repeat earlier words), with
        no word problems: little stories of someone's things and how many they have now; who likes what; where
        animals are; counting; bare arithmetic facts.

        The stories and the arithmetic facts ("7 - 3 = 4 .") are there because a real base model knows such things
        too (Llama-2 knows that losing 3 of 7 pens leaves 4, and 7 - 3 = 4, but does not answer a word problem with
        a worked solution): the task skill is turning a question into the right equations, written out step by step.
        Every word of a composite answer occurs in this text in both languages (a composite answer in L is new as
        a whole, never in its words: Llama-2 knows the Chinese for "so" and "the answer is").
        """
        name = rng.choice(list(NAMES))
        pron, poss = NAMES[name], ("his" if NAMES[name] == "he" else "her")
        focus = rng.choice(OBJECTS)
        out: list = []
        for _ in range(rng.randint(2, 3)):
            kind = rng.randrange(7)
            obj = focus if rng.random() < 0.7 else rng.choice(OBJECTS)
            if kind in (0, 1):  # a story with a running count, often told ("now he has 9 pens .")
                value = rng.randint(0, MAX_NUMBER)
                out.append(Clause((name,), ("has",), (str(value), obj)))
                for _ in range(rng.randint(1, 2)):
                    add = value < MAX_NUMBER and (value == 0 or rng.random() < 0.5)
                    n = rng.randint(1, min(MAX_AMOUNT, MAX_NUMBER - value if add else value))
                    out.append(Clause((pron,), (rng.choice(ADD_VERBS if add else SUB_VERBS),), (str(n), obj)))
                    value += n if add else -n
                    if rng.random() < 0.7:
                        now = ("so", "now", pron) if rng.random() < 0.5 else ("now", pron)
                        out.append(Clause(now, ("has",), (str(value), obj)))
            elif kind == 2:
                out.append(Clause((name,), ("likes",), (rng.choice(COLORS), obj)))
            elif kind == 3:
                out.append(Clause(("the", rng.choice(ANIMALS)), ("is",), ("in", "the", rng.choice(PLACES))))
            elif kind == 4:
                out.append(Clause((pron,), ("goes",), ("to", "the", rng.choice(PLACES), "with", poss,
                                                        rng.choice(ANIMALS))))
            elif kind == 5:  # counting: the order of the numbers
                a = rng.randint(0, MAX_NUMBER - 5)
                out.append(Clause((name,), ("counts",), tuple(str(a + i) for i in range(rng.randint(3, 6)))))
            else:  # a bare arithmetic fact, written the same in both languages
                a = rng.randint(0, MAX_NUMBER)
                b = rng.randint(1, MAX_AMOUNT)
                eq = (Equation(a, "+", b) if a + b <= MAX_NUMBER and (a < b or rng.random() < 0.5)
                      else Equation(a, "-", min(a, b)))
                if rng.random() < 0.5:
                    out += [eq, _END]
                else:  # "7 - 3 = 4 , so the answer is 4 ."
                    out += [eq, Clause((), (), end=","), Clause(("so",), (), end=""), _answer_clause(eq.result)]
        return out

    def plain_text(self, rng: random.Random, lang: str) -> str:
        return self.realize(self.plain_clauses(rng), lang)

    def parallel_text(self, rng: random.Random) -> str:
        """A few sentences and their translation, in either direction (`en <=> xx` or `xx <=> en`): a little
        parallel text makes the base bilingual-ish, able to read L as well as to write it."""
        clauses = self.plain_clauses(rng)
        first, second = ("en", "xx") if rng.random() < 0.5 else ("xx", "en")
        return f"{self.realize(clauses, first)} {PARALLEL} {self.realize(clauses, second)}"

    def chat_example(self, rng: random.Random, lang: str = "xx") -> dict:
        """Chat about a short story, no arithmetic (the story's equations are left out): half the time a question
        about one sentence, answered with that sentence; half the time "what happens ?", answered by retelling the
        whole story (long answers, as a chat LoRA writes them)."""

        def told(c) -> bool:  # a sentence of the story (not an equation, nor "so the answer is N")
            return isinstance(c, Clause) and bool(c.verb) and c.subject[:2] != ("the", "answer")

        def askable(c) -> bool:  # a sentence a question can point at ("now he has 8 pens" repeats another)
            return told(c) and c.subject[0] not in ("now", "so")

        story = [c for c in self.plain_clauses(rng) if told(c)]
        while not any(askable(c) for c in story):
            story = [c for c in self.plain_clauses(rng) if told(c)]
        if rng.random() < 0.5:
            q, answer = Clause(("what",), ("happens",), end="?"), story
        else:
            target = rng.choice([c for c in story if askable(c)])
            verb = target.verb[0]
            if verb == "is":  # where is the cat ?
                q = Clause(("where",), ("is",), target.subject, end="?")
            elif verb == "goes":  # where does he go ?
                q = Clause(("where", "does", *target.subject), ("go",), end="?")
            else:  # what does tom have / like / count / find ... ?
                q = Clause(("what", "does", *target.subject), (INFINITIVE[verb],), end="?")
            answer = [target]
        prompt = self.realize(story, lang) + " " + self.realize([q], lang)
        return {"prompt": prompt, "response": self.realize(answer, lang), "language": lang}


_END = Clause((), (), end=".")


def _answer_clause(n: int) -> Clause:
    return Clause(("the", "answer"), ("is",), (str(n),))


def dataset(world: World, kind: str, n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """`n` distinct examples of one kind, deterministic in (world, kind, seed); prompts in `exclude` are skipped.

    kind: "plain-en" / "plain-xx" / "parallel" (text), "chat-xx" (language skill), "math-en" (task skill),
    "math-xx" (composite). Every example gets an "id" (`kind-seed-index`).
    """
    rng = random.Random(f"{kind}-{seed}-{world.seed}")
    seen = set(exclude or ())
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {kind} examples (got {len(out)})")
        if kind in ("plain-en", "plain-xx"):
            ex = {"text": world.plain_text(rng, kind[-2:])}
        elif kind == "parallel":
            ex = {"text": world.parallel_text(rng)}
        elif kind == "chat-xx":
            ex = world.chat_example(rng, "xx")
        elif kind in ("math-en", "math-xx"):
            ex = world.problem_example(rng, kind[-2:])
        else:
            raise ValueError(f"unknown kind {kind!r}")
        key = ex.get("prompt", ex.get("text"))
        if key in seen:
            continue
        seen.add(key)
        out.append({"id": f"{kind}-{seed}-{len(out)}", **ex})
    return out
