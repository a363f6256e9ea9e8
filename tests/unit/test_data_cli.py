"""The data command lines end every user-fixable fault with `error: <one line>` on stderr and status 2."""

import json
import re

import pytest

from pipeline.data.__main__ import main
from pipeline.errors import EXIT_USER_ERROR


def write_jsonl(path, key):
    path.write_text("".join(json.dumps({key: f"document {i}"}) + "\n" for i in range(3)), encoding="utf-8")
    return str(path)


CASES = {
    "preprocess: missing input": lambda d: (
        ["preprocess", "--input", str(d / "absent.jsonl"), "--output", str(d / "out"), "--tokenizer", "t"],
        "absent.jsonl does not exist"),
    "preprocess: no documents": lambda d: (
        ["preprocess", "--input", write_jsonl(d / "in.jsonl", "body"), "--output", str(d / "out"),
         "--tokenizer", tokenizer_file(d), "--workers", "1", "--no-progress"],
        "no documents in .*field 'text'; fields present: body; .*--text-key"),
    "preprocess: output below a file": lambda d: (
        ["preprocess", "--input", write_jsonl(d / "in.jsonl", "text"), "--output", str(d / "in.jsonl" / "out"),
         "--tokenizer", "t"],
        "in.jsonl"),
    "corpus: output below a file": lambda d: (
        ["corpus", "--out", write_jsonl(d / "in.jsonl", "text") + "/build", "--no-progress"],
        "cannot write|failed"),
    "tokenizer: missing input": lambda d: (
        ["tokenizer", "train", "--input", str(d / "absent"), "--vocab-size", "300", "--out", str(d / "tok")],
        "absent does not exist"),
}


def tokenizer_file(directory):
    from pipeline.data.sentencepiece_training import train_sentencepiece_bpe

    train_sentencepiece_bpe([f"some text number {i} for a tiny tokenizer" for i in range(200)],
                            str(directory / "tok"), vocab_size=300)
    return str(directory / "tok" / "tokenizer.model")


@pytest.mark.parametrize("case", list(CASES))
def test_data_command_exits_2_with_one_error_line(tmp_path, capsys, case):
    argv, message = CASES[case](tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    assert re.search(message, err[-1]), err[-1]
