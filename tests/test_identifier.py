import pytest

from lorabooth.commands.cli import main
from lorabooth.models.loading import clip_tokenizer
from lorabooth.photos.identifier import (
    candidates,
    check_prompt,
    guess_identifier,
    identifier_warnings,
    rare_identifiers,
)


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_candidates_are_short_rare_single_tokens_that_round_trip(tok):
    found = candidates(tok)
    assert len(found) > 50
    for c in found:
        assert 1 <= len(c.token) <= 3 and c.token.isalpha() and c.token.islower()
        assert tok(c.token, add_special_tokens=False).input_ids == [c.id]
        assert tok.decode([c.id]).strip() == c.token
        assert c.zipf < 1.5
    ranks = [c.merge_rank for c in found]
    assert ranks == sorted(ranks, reverse=True)  # rarest first
    assert not {"dog", "the", "cat", "sks"} & {c.token for c in found}


def test_n_and_seed(tok):
    top = rare_identifiers(tok, n=5)
    assert len(top) == 5 and top == candidates(tok)[:5]
    a, b = rare_identifiers(tok, n=5, seed=1), rare_identifiers(tok, n=5, seed=1)
    assert a == b and len(a) == 5 and rare_identifiers(tok, n=5, seed=2) != a


def test_guess_identifier():
    assert guess_identifier("a photo of sks dog", "a photo of a dog") == ["sks"]
    assert guess_identifier("a photo of zwx dog") == ["zwx"]


def test_warnings(tok):
    assert identifier_warnings(tok, "a photo of sks dog", "a photo of a dog") == []
    multi = identifier_warnings(tok, "a photo of xyzzyq dog", "a photo of a dog")
    assert len(multi) == 1 and "splits into 3 tokens" in multi[0]
    common = identifier_warnings(tok, "a photo of blue dog", "a photo of a dog")
    assert len(common) == 1 and "common English word" in common[0]


def test_check_prompt_table(tok):
    table, warnings = check_prompt("a photo of xyzzyq dog", tok)
    assert "xy zzy q</w>" in table and "identifier?" in table and warnings


def test_cli(capsys):
    assert main(["identifier", "--n", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["token", "id"] and len(out) == 4
    assert main(["identifier", "--check", "a photo of sks dog"]) == 0
    assert "sks</w>" in capsys.readouterr().out


def test_train_warns_about_a_common_identifier(photos, tmp_path, caplog):
    from lorabooth import TrainConfig, train

    train(TrainConfig(instance_dir=str(photos), instance_prompt="a photo of blue dog",
                      class_prompt="a photo of a dog", steps=1, output=str(tmp_path / "r")))
    assert any("common English word" in r.getMessage() for r in caplog.records)
