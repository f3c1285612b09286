"""`hypo export`: the model's answers in the files AlpacaEval 2 and MT-Bench (FastChat) read, generated on the
tiny model; the second MT-Bench turn sees the first question and answer; FastChat's temperatures."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from hypo.cli.main import main
from hypo.evaluation.export import MT_BENCH_TEMPERATURES, alpaca_eval_outputs, mt_bench_answers

ALPACA = [{"dataset": "helpful_base", "instruction": "Write a short review of a cafe.",
           "output": "reference answer", "generator": "gpt4_turbo"},
          {"dataset": "koala", "instruction": "Write a short review of a phone.", "output": "another",
           "generator": "gpt4_turbo"}]
MT_BENCH = [{"question_id": 81, "category": "writing", "turns": ["Write a short review of a hotel.",
                                                                 "Now make it shorter."]},
            {"question_id": 111, "category": "math", "turns": ["What is two plus two?", "And plus six?"]}]


def test_alpaca_eval_file(tiny_model_dir, tmp_path):
    questions = tmp_path / "alpaca_eval.json"
    questions.write_text(json.dumps(ALPACA))
    out = tmp_path / "outputs.json"
    argv = ["export", "--model", str(tiny_model_dir), "--format", "alpaca_eval", "--questions", str(questions),
            "--output", str(out), "--name", "tiny-hypo", "--max_new_tokens", "6"]
    assert main(argv) == 0
    records = json.loads(out.read_text())
    assert [set(r) for r in records] == [{"instruction", "output", "generator", "dataset"}] * 2
    assert [r["instruction"] for r in records] == [q["instruction"] for q in ALPACA]
    assert [r["dataset"] for r in records] == ["helpful_base", "koala"]
    assert all(r["generator"] == "tiny-hypo" and isinstance(r["output"], str) for r in records)
    assert records[0]["output"] != "reference answer"
    again = tmp_path / "again.json"  # greedy by default: the same answers
    assert main([*argv[:-5], str(again), "--name", "tiny-hypo", "--max_new_tokens", "6"]) == 0
    assert json.loads(again.read_text()) == records


def test_mt_bench_file(tiny_model_dir, tmp_path):
    questions = write_jsonl(tmp_path / "question.jsonl", MT_BENCH)
    out = tmp_path / "model_answer" / "tiny-hypo.jsonl"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "mt_bench", "--questions", str(questions),
                 "--output", str(out), "--name", "tiny-hypo", "--max_new_tokens", "5"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    # what FastChat's gen_judgment reads: answers by question_id, choices[0]["turns"][0 and 1]
    by_id = {a["question_id"]: a for a in answers}
    assert set(by_id) == {81, 111}
    for answer in answers:
        assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert answer["model_id"] == "tiny-hypo" and isinstance(answer["tstamp"], float)
        assert answer["choices"][0]["index"] == 0 and len(answer["choices"][0]["turns"]) == 2
    assert len({a["answer_id"] for a in answers}) == 2


def test_second_turn_sees_the_first_and_temperatures_follow_fastchat():
    seen = []

    def answer(conversations, temperatures):
        seen.append(list(zip([c[:] for c in conversations], temperatures, strict=True)))
        return [f"answer {len(c)}" for c in conversations]

    answers = mt_bench_answers(MT_BENCH + [{"question_id": 7, "category": "new", "turns": ["Only one turn."]}],
                               answer, model_id="m")
    first_turns, second_turns = seen
    assert [t for _, t in first_turns] == [MT_BENCH_TEMPERATURES["writing"], MT_BENCH_TEMPERATURES["math"], 0.7]
    conversation, _ = second_turns[0]
    assert conversation == [{"role": "user", "content": MT_BENCH[0]["turns"][0]},
                            {"role": "assistant", "content": "answer 1"},
                            {"role": "user", "content": MT_BENCH[0]["turns"][1]}]
    assert len(second_turns) == 2  # the one-turn question is done after its first turn
    assert [a["choices"][0]["turns"] for a in answers] == [["answer 1", "answer 3"]] * 2 + [["answer 1"]]
    fixed = []
    mt_bench_answers(MT_BENCH, lambda c, t: fixed.extend(t) or ["x"] * len(c), model_id="m", temperature=0.0)
    assert fixed == [0.0] * 4


def test_question_rows_are_checked():
    with pytest.raises(ValueError, match="row 1: field 'turns'"):
        mt_bench_answers([{"question_id": 1, "turns": "not a list"}], lambda c, t: [], model_id="m")
    with pytest.raises(ValueError, match="row 2: expected a non-empty 'instruction'"):
        alpaca_eval_outputs([ALPACA[0], {"output": "x"}], lambda c, t: [], generator="g", temperature=0.0)
    prompts = [{"prompt": [{"role": "user", "content": "Hello?"}]}]  # hypo's own prompt rows work too
    records = alpaca_eval_outputs(prompts, lambda c, t: ["hi"] * len(c), generator="g", temperature=0.0)
    assert records == [{"instruction": "Hello?", "output": "hi", "generator": "g"}]


@pytest.mark.parametrize("command", ["export", "sft"])
def test_new_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"hypo {command}" in capsys.readouterr().out
    main(["--help"])
    assert f"hypo {command}" in capsys.readouterr().out


def test_export_refuses_bad_options(tiny_model_dir, tmp_path, capsys):
    questions = write_jsonl(tmp_path / "question.jsonl", MT_BENCH)
    argv = ["export", "--model", str(tiny_model_dir), "--format", "mt_bench", "--questions", str(questions),
            "--output", str(tmp_path / "out.jsonl"), "--temperature", "-1"]
    assert main(argv) == 2 and "--temperature >= 0" in capsys.readouterr().err
