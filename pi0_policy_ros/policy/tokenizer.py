"""Prompt tokenization for pi0 / pi0.5 (spec: shared/spec/openpi_pipeline.md, section 2).

The real models use PaliGemma's SentencePiece vocabulary (257,152 pieces). openpi downloads that
file at run time; we cannot, so it is a path (a file, or a directory holding it).

Public API:
    find_tokenizer_model(*candidates) -> Path
        The first existing SentencePiece file among files / directories; ConfigError listing every
        path looked at otherwise.
    PromptTokenizer(model_path, max_token_len, discrete_state_input)
        .tokenize(prompt, state=None) -> TokenizedPrompt
        .vocab_size, .bos_id, .max_token_len, .discrete_state_input
    TokenizedPrompt(ids int64 [L], mask bool [L], truncated)
    train_tiny_tokenizer(path) -> Path
        A small deterministic SentencePiece model for tests and random-weight demos.

Prompt formats (checked against openpi `models/tokenizer.py`):
    pi0, and pi0.5 without discrete state: BOS + encode(cleaned) + encode("\\n"), the separately
        encoded newline being the start-of-answer token.
    pi0.5 with discrete state: BOS + encode(f"Task: {cleaned}, State: {bins};\\nAction: "), no EOS,
        where bins are the normalized, unpadded state digitized into 256 bins over [-1, 1].
Cleaning strips the prompt and turns "_" and newlines into spaces; it does not lowercase.
"""

from __future__ import annotations

import io
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece

from pi0_policy_ros.atomic_write import write_atomic
from pi0_policy_ros.errors import ConfigError, ObservationError, echo
from pi0_policy_ros.policy.types import as_real_array

logger = logging.getLogger(__name__)

# File names tried, in order, when a directory is given (openpi's name first).
TOKENIZER_FILE_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")
PALIGEMMA_VOCAB_SIZE = 257_152
# 256 bins over [-1, 1]: the 257 edges without the last one, so values >= 1 - 1/128 fall in bin 255
# and values below -1 in bin -1 (openpi does not clip).
_STATE_BIN_EDGES = np.linspace(-1.0, 1.0, 256 + 1)[:-1]
_PAD_ID = 0


@dataclass(frozen=True, eq=False)
class TokenizedPrompt:
    """A prompt as the model reads it.

    ids: int64 [max_token_len], right-padded with 0.
    mask: bool [max_token_len], True on real tokens.
    truncated: the prompt was longer than max_token_len and was cut on the right.
    """

    ids: np.ndarray
    mask: np.ndarray
    truncated: bool

    def __post_init__(self) -> None:
        self.ids.setflags(write=False)
        self.mask.setflags(write=False)

    @property
    def num_tokens(self) -> int:
        """Number of real (unmasked) tokens."""
        return int(self.mask.sum())


def find_tokenizer_model(*candidates: str | Path) -> Path:
    """Return the first SentencePiece model found among `candidates`.

    A candidate is a file, or a directory searched for `TOKENIZER_FILE_NAMES`. Empty strings are
    skipped, so optional parameters can be passed as they are.
    """
    looked_at: list[str] = []
    for candidate in candidates:
        if not str(candidate):
            continue
        path = Path(candidate).expanduser()
        options = [path / name for name in TOKENIZER_FILE_NAMES] if path.is_dir() else [path]
        for option in options:
            if option.is_file():
                return option
            looked_at.append(str(option))
    raise ConfigError(
        "SentencePiece tokenizer model not found (the PaliGemma file is "
        f"'{TOKENIZER_FILE_NAMES[0]}'); looked at: {looked_at or 'no path given'}"
    )


def clean_prompt(prompt: str) -> str:
    """openpi's cleaning: strip, then '_' and newlines become spaces. No lowercasing."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Bin ids of a normalized state, as pi0.5 writes them into its prompt (-1 .. 255)."""
    return np.digitize(state, _STATE_BIN_EDGES) - 1


def discrete_state_text(cleaned_prompt: str, state: np.ndarray) -> str:
    """The exact pi0.5 discrete-state prompt text (note the trailing space)."""
    bins = " ".join(str(int(b)) for b in discretize_state(state))
    return f"Task: {cleaned_prompt}, State: {bins};\nAction: "


class PromptTokenizer:
    """Turns a prompt (and, for pi0.5 with discrete state, the state) into model token ids."""

    def __init__(self, model_path: str | Path, max_token_len: int, discrete_state_input: bool) -> None:
        if max_token_len <= 0:
            raise ConfigError(f"max_token_len must be > 0, found {max_token_len}")
        path = find_tokenizer_model(model_path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"{path} is not a SentencePiece model: {exc}") from exc
        if self._sp.bos_id() < 0:
            raise ConfigError(f"tokenizer {path} defines no BOS id; pi0 prompts start with BOS")
        self.model_path = path
        self.max_token_len = max_token_len
        self.discrete_state_input = discrete_state_input
        # Truncation warns once per prompt, then logs at DEBUG: the same prompt repeats every
        # inference, but a new one (the task changed) is cut differently and warned again.
        self._warned_prompt: str | None = None

    @property
    def vocab_size(self) -> int:
        """Number of pieces (257,152 for PaliGemma); the model's embedding must be this big."""
        return int(self._sp.get_piece_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    def encode(self, text: str) -> list[int]:
        """Plain SentencePiece encoding, without BOS / EOS."""
        return list(self._sp.encode(text))

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of the given ids (BOS and padding ids decode to nothing)."""
        return str(self._sp.decode([int(i) for i in ids]))

    def tokenize(self, prompt: str | None, state: np.ndarray | None = None) -> TokenizedPrompt:
        """Token ids and mask of `prompt`, padded or cut to `max_token_len`.

        state: the normalized state at the robot's own dims (not padded). Required when
            `discrete_state_input` is set, ignored otherwise (pi0 feeds the state to the
            action expert instead).
        Raises ObservationError for a missing / empty prompt or a missing / bad state.
        """
        cleaned = clean_prompt(prompt) if isinstance(prompt, str) else ""
        if not cleaned.strip():
            raise ObservationError(f"Prompt is required: expected a non-empty string, found {echo(prompt)}")
        if self.discrete_state_input:
            text = discrete_state_text(cleaned, _check_state(state))
            tokens = [self.bos_id, *self.encode(text)]
        else:
            tokens = [self.bos_id, *self.encode(cleaned), *self.encode("\n")]
        return self._fit(tokens, cleaned)

    def _fit(self, tokens: list[int], cleaned: str) -> TokenizedPrompt:
        """Right-pad with 0 / mask False, or cut on the right with every position valid."""
        length = len(tokens)
        limit = self.max_token_len
        truncated = length > limit
        if truncated:
            self._log_truncation(length, cleaned)
            tokens = tokens[:limit]
        ids = np.full(limit, _PAD_ID, dtype=np.int64)
        ids[: len(tokens)] = tokens
        mask = np.arange(limit) < len(tokens)
        return TokenizedPrompt(ids=ids, mask=mask, truncated=truncated)

    def _log_truncation(self, length: int, cleaned: str) -> None:
        # Keyed by the prompt, not the whole text: pi0.5's state in it changes every inference.
        level = logging.DEBUG if cleaned == self._warned_prompt else logging.WARNING
        self._warned_prompt = cleaned
        logger.log(
            level,
            "prompt longer than the token budget: expected at most %d tokens (max_token_len, the model's: "
            "its checkpoint's or preset's; prompt and state included), found %d: cut on the right; shorten the prompt",
            self.max_token_len,
            length,
        )


def _check_state(state: np.ndarray | None) -> np.ndarray:
    if state is None:
        raise ObservationError(
            "State is required: pi0.5 with discrete state input writes the state into the prompt, found None"
        )
    # Strings and dicts raised numpy's ValueError / TypeError; complex values lost their imaginary
    # part (a warning) and were written into the prompt.
    array = as_real_array(state, "state must be a 1-D vector of real numbers")
    if array.ndim != 1 or array.size == 0:
        raise ObservationError(f"state must be a non-empty 1-D vector, found shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ObservationError(f"state must be finite, found {array.tolist()}")
    return array


# --- A tiny tokenizer for tests and random-weight demos -------------------------------------------

_VERBS = ("pick up", "put", "move", "push", "open", "close", "grasp", "lift", "place", "stack",
          "slide", "turn on", "turn off", "fold", "wipe", "pour", "hand over", "flip")
_COLOURS = ("red", "green", "blue", "black", "white", "yellow", "wooden", "small", "large")
_OBJECTS = ("cup", "bowl", "block", "mug", "plate", "towel", "pen", "bottle", "sponge", "lid",
            "box", "drawer", "cabinet door", "stove", "microwave", "basket")
_PLACES = ("on the plate", "in the basket", "into the drawer", "on the shelf", "to the left",
           "to the right", "next to the stove", "onto the table", "under the cabinet",
           "behind the box", "in front of the robot", "on top of the tray")


def _tiny_corpus() -> list[str]:
    """A few hundred short robot instructions, plus lines in pi0.5's prompt layout.

    Combinatorial and strided, so the corpus is fixed yet varied without any data file.
    """
    combos = itertools.product(_VERBS, _COLOURS, _OBJECTS, _PLACES)
    instructions = [f"{v} the {c} {o} {p}" for v, c, o, p in itertools.islice(combos, 0, None, 97)]
    capitalised = [line[0].upper() + line[1:] + "." for line in instructions[::3]]
    numbers = [" ".join(str((7 * i + 31 * k) % 256) for k in range(8)) for i in range(40)]
    prompts = [f"Task: {line}, State: {bins};" for line, bins in zip(instructions, numbers)]
    answers = ["Action: " + line for line in instructions[:20]]
    return instructions + capitalised + prompts + answers


def train_tiny_tokenizer(path: str | Path, vocab_size: int = 1000) -> Path:
    """Train a small SentencePiece model into `path` (a file path) and return it.

    Deterministic (one thread, no sampling, no shuffling) and fast (tens of milliseconds). Its ids
    follow PaliGemma's layout for the special pieces: pad 0, eos 1, bos 2, unk 3. Byte fallback
    encodes any text, including the newline of the pi0 / pi0.5 formats. `vocab_size` is an upper
    bound: the corpus is small, so the model may have fewer pieces.
    """
    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()),
        model_writer=writer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        # Like Gemma's tokenizer: text is kept as is, so "\n" survives to the byte pieces.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    # Random-weight policies in several processes share one file in the temp directory: one loading
    # it while another rewrote it in place read a cut model ("is not a SentencePiece model").
    return write_atomic(path, writer.getvalue())
