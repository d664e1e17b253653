"""Prompt tokenizer: formats of spec section 2, checked with a tokenizer trained in the test."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.policy import tokenizer as tok
from pi0_policy_ros.policy.tokenizer import PromptTokenizer, discretize_state, find_tokenizer_model, train_tiny_tokenizer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="module")
def sp(model_path: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(model_path))


def test_tiny_tokenizer_is_deterministic_and_paligemma_like(tmp_path: Path) -> None:
    first = train_tiny_tokenizer(tmp_path / "a.model")
    second = train_tiny_tokenizer(tmp_path / "sub" / "b.model")
    assert first.read_bytes() == second.read_bytes()
    processor = sentencepiece.SentencePieceProcessor(model_file=str(first))
    assert (processor.pad_id(), processor.eos_id(), processor.bos_id(), processor.unk_id()) == (0, 1, 2, 3)
    assert 260 < processor.get_piece_size() <= 1000
    assert len(tok._tiny_corpus()) >= 300


def test_pi0_format_is_bos_text_newline_then_padding(model_path: Path, sp: sentencepiece.SentencePieceProcessor) -> None:
    tokenizer = PromptTokenizer(model_path, max_token_len=48, discrete_state_input=False)
    result = tokenizer.tokenize("pick up the red cup")
    expected = [sp.bos_id(), *sp.encode("pick up the red cup"), *sp.encode("\n")]
    assert result.ids.dtype == np.int64 and result.mask.dtype == np.bool_
    assert result.ids.shape == result.mask.shape == (48,)
    assert result.ids[: len(expected)].tolist() == expected
    assert not result.ids[len(expected) :].any()
    assert result.mask.tolist() == [True] * len(expected) + [False] * (48 - len(expected))
    assert result.num_tokens == len(expected) and not result.truncated
    assert result.ids[0] == 2 and sp.eos_id() not in result.ids.tolist()
    assert tokenizer.decode(result.ids[result.mask]) == "pick up the red cup\n"


def test_same_prompt_gives_same_ids_across_trainings(tmp_path: Path) -> None:
    prompt = "Put the black bowl on the plate"
    results = [
        PromptTokenizer(train_tiny_tokenizer(tmp_path / f"{i}.model"), 48, False).tokenize(prompt) for i in range(2)
    ]
    assert results[0].ids.tolist() == results[1].ids.tolist()
    assert results[0].mask.tolist() == results[1].mask.tolist()


def test_cleaning_strips_and_replaces_underscores_and_newlines_but_keeps_case(model_path: Path) -> None:
    tokenizer = PromptTokenizer(model_path, 48, False)
    messy = tokenizer.tokenize("  pick_up the\nred cup \n")
    clean = tokenizer.tokenize("pick up the red cup")
    assert messy.ids.tolist() == clean.ids.tolist()
    assert tokenizer.tokenize("Pick up the red cup").ids.tolist() != clean.ids.tolist()


def test_state_is_ignored_without_discrete_state_input(model_path: Path) -> None:
    tokenizer = PromptTokenizer(model_path, 48, False)
    with_state = tokenizer.tokenize("open the drawer", np.zeros(8))
    assert with_state.ids.tolist() == tokenizer.tokenize("open the drawer").ids.tolist()


def test_pi05_discrete_state_format(model_path: Path, sp: sentencepiece.SentencePieceProcessor) -> None:
    tokenizer = PromptTokenizer(model_path, max_token_len=200, discrete_state_input=True)
    state = np.array([-1.5, -1.0, 0.0, 0.5, 0.9921875, 1.0, 3.0, -0.99])
    result = tokenizer.tokenize(" close_the drawer\n", state)
    text = "Task: close the drawer, State: -1 0 128 192 255 255 255 1;\nAction: "
    expected = [sp.bos_id(), *sp.encode(text)]
    assert result.ids[: len(expected)].tolist() == expected
    assert result.mask.sum() == len(expected) and not result.ids[len(expected) :].any()
    assert sp.eos_id() not in result.ids.tolist()
    assert tokenizer.decode(result.ids[result.mask]) == text


def test_discretize_state_uses_256_left_edges_without_clipping() -> None:
    values = np.array([-2.0, -1.0, -0.9921875, -1e-9, 0.0, 0.9921874, 0.9921875, 1.0, 7.0])
    assert discretize_state(values).tolist() == [-1, 0, 1, 127, 128, 254, 255, 255, 255]


def test_truncation_cuts_on_the_right_sets_mask_and_warns_once(
    model_path: Path, sp: sentencepiece.SentencePieceProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = "pick up the red cup and put it in the basket next to the stove"
    full = [sp.bos_id(), *sp.encode(prompt), *sp.encode("\n")]
    tokenizer = PromptTokenizer(model_path, max_token_len=10, discrete_state_input=False)
    with caplog.at_level(logging.DEBUG, logger=tok.__name__):
        first = tokenizer.tokenize(prompt)
        second = tokenizer.tokenize(prompt)
    assert len(full) > 10
    assert first.ids.tolist() == full[:10] and first.mask.all() and first.truncated
    assert second.ids.tolist() == full[:10] and second.truncated
    levels = [record.levelno for record in caplog.records if record.name == tok.__name__]
    assert levels == [logging.WARNING, logging.DEBUG]


def test_each_new_prompt_over_the_budget_is_warned_once(model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Only the first long prompt of a tokenizer's life was warned: a task changed later to another
    # long prompt was cut with a DEBUG line only (silently, at the default level).
    tokenizer = PromptTokenizer(model_path, max_token_len=10, discrete_state_input=True)
    first, second = "pick up the red cup " * 5, "put the blue bowl on the plate " * 5
    with caplog.at_level(logging.DEBUG, logger=tok.__name__):
        for prompt in (first, first, second, second, first):
            assert tokenizer.tokenize(prompt, np.array([0.1, -0.5])).truncated
    levels = [record.levelno for record in caplog.records if record.name == tok.__name__]
    assert levels == [logging.WARNING, logging.DEBUG, logging.WARNING, logging.DEBUG, logging.WARNING]


def test_prompt_of_exactly_max_length_is_not_truncated(model_path: Path, sp: sentencepiece.SentencePieceProcessor) -> None:
    length = 1 + len(sp.encode("stack the blocks")) + len(sp.encode("\n"))
    result = PromptTokenizer(model_path, length, False).tokenize("stack the blocks")
    assert result.mask.all() and not result.truncated


@pytest.mark.parametrize("prompt", [None, "", "   ", "\n_\n"])
def test_missing_prompt_is_an_observation_error(model_path: Path, prompt: str | None) -> None:
    with pytest.raises(ObservationError, match="Prompt is required"):
        PromptTokenizer(model_path, 48, False).tokenize(prompt)


def test_a_long_blank_prompt_is_cut_in_the_error(model_path: Path) -> None:
    # A ~/prompt of 10000 blanks went whole into the error, the log and /diagnostics.
    with pytest.raises(ObservationError, match=r"Prompt is required: expected a non-empty string, found "
                                               r"' +\.\.\.' \(10000 characters\)$"):
        PromptTokenizer(model_path, 48, False).tokenize(" " * 10000)


def test_discrete_state_needs_a_finite_vector_state(model_path: Path) -> None:
    tokenizer = PromptTokenizer(model_path, 200, True)
    with pytest.raises(ObservationError, match="State is required"):
        tokenizer.tokenize("open the drawer")
    with pytest.raises(ObservationError, match="1-D"):
        tokenizer.tokenize("open the drawer", np.zeros((2, 4)))
    with pytest.raises(ObservationError, match="finite"):
        tokenizer.tokenize("open the drawer", np.array([0.0, np.nan]))


@pytest.mark.parametrize("state, found", [(["a", "b"], "list of dtype <U1"), ({"a": 1.0}, "dict of dtype object"),
                                          (np.ones(3) + 1j, "ndarray of dtype complex128"),
                                          ([np.zeros(2), 1.0], "list that is not one numeric array")])
def test_discrete_state_that_is_not_real_numbers_is_an_observation_error(model_path: Path, state: object,
                                                                         found: str) -> None:
    # Strings, a dict and a ragged list raised numpy's ValueError / TypeError; complex values were
    # written into the prompt without their imaginary part.
    with pytest.raises(ObservationError, match=f"state must be a 1-D vector of real numbers, found {found}"):
        PromptTokenizer(model_path, 200, True).tokenize("open the drawer", state)


def test_missing_tokenizer_file_names_every_path_looked_at(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        PromptTokenizer(tmp_path, 48, False)
    assert str(tmp_path / "paligemma_tokenizer.model") in str(error.value)
    assert str(tmp_path / "tokenizer.model") in str(error.value)
    with pytest.raises(ConfigError, match="nothing.model"):
        find_tokenizer_model("", tmp_path / "nothing.model")


def test_directory_lookup_prefers_the_paligemma_file_name(tmp_path: Path) -> None:
    train_tiny_tokenizer(tmp_path / "tokenizer.model")
    assert find_tokenizer_model(tmp_path) == tmp_path / "tokenizer.model"
    train_tiny_tokenizer(tmp_path / "paligemma_tokenizer.model")
    assert find_tokenizer_model("", tmp_path) == tmp_path / "paligemma_tokenizer.model"
    assert PromptTokenizer(tmp_path, 48, False).vocab_size > 0


def test_max_token_len_must_be_positive(model_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_token_len"):
        PromptTokenizer(model_path, 0, False)


def test_tokenized_prompt_arrays_are_read_only(model_path: Path) -> None:
    result = PromptTokenizer(model_path, 48, False).tokenize("wipe the table")
    with pytest.raises(ValueError):
        result.ids[0] = 5


def test_a_file_that_is_not_a_sentencepiece_model_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        PromptTokenizer(bad, 48, False)


def _retrain(path: Path, times: int) -> None:
    for _ in range(times):
        train_tiny_tokenizer(path)


def test_a_tokenizer_retrained_by_another_process_is_never_read_half_written(tmp_path: Path) -> None:
    """Random-weight policies in several processes (demos, benchmarks, parallel tests) train into one
    file in the temp directory: rewritten in place, one loading it meanwhile read a cut model."""
    path = train_tiny_tokenizer(tmp_path / "shared.model")
    writer = multiprocessing.get_context("spawn").Process(target=_retrain, args=(path, 40))
    writer.start()
    failures = []
    try:
        while writer.is_alive():
            try:
                sentencepiece.SentencePieceProcessor(model_file=str(path))
            except (OSError, RuntimeError) as exc:
                failures.append(str(exc))
    finally:
        writer.join()
    assert writer.exitcode == 0 and not failures, failures[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["shared.model"]  # no temporary file left behind
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode == plain.stat().st_mode  # the umask's mode, as a plain write's (not 0600)
