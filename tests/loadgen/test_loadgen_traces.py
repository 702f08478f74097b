"""Trace replay: the three formats parse, order and relative times are kept (scaled by the speedup),
`limit`, `start_s` and the function mapping work, and malformed files name the file, the line and the problem."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kold.loadgen.schedule import PlannedRequest
from kold.loadgen.shapes import Fixed, Uniform
from kold.loadgen.traces import TraceError, parse_functions, read_trace

LLM_ROWS = [  # seconds after the first row, ContextTokens, GeneratedTokens
    ("2023-11-16 18:15:46.6805900", 4808, 10),
    ("2023-11-16 18:15:50.9951690", 3180, 8),
    ("2023-11-16 18:15:50.9951690", 110, 0),  # the same instant twice, and an output length of 0
    ("2023-11-16 18:15:51.2507930", 2119, 27),
    ("2023-11-16 18:16:01.1000000", 7, 300),
]
LLM_OFFSETS = [0.0, 4.314579, 4.314579, 4.570203, 14.4194100]


def write_llm(path: Path, rows: list[tuple[str, int, int]] = LLM_ROWS) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens", *(f"{t},{c},{g}" for t, c, g in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_mooncake(path: Path) -> Path:
    rows = [
        {"timestamp": 1000, "input_length": 6955, "output_length": 52, "hash_ids": [0, 1, 2]},
        {"timestamp": 1250, "input_length": 6472, "output_length": 26, "hash_ids": [0, 3]},
        {"timestamp": 4000, "input_length": 100, "output_length": 5},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


FUNCTION_ROWS = [  # HashFunction, counts for minutes 1, 2, 3
    ("f-alpha", [3, 0, 5]),
    ("f-beta", [0, 40, 1]),
    ("f-gamma", [2, 2, 0]),
]


def write_functions(path: Path) -> Path:
    lines = ["HashOwner,HashApp,HashFunction,Trigger,1,2,3"]
    lines += [f"o{i},a{i},{name},http,{','.join(map(str, counts))}" for i, (name, counts) in enumerate(FUNCTION_ROWS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def replay_functions(path: Path, **kwargs: object) -> list[PlannedRequest]:
    return read_trace(path, prompt=Fixed(64), output=Uniform(5, 9), **kwargs)  # type: ignore[arg-type]


# -- azure-llm ----------------------------------------------------------------------------------------


def test_azure_llm_keeps_order_relative_times_and_lengths(tmp_path: Path) -> None:
    plan = read_trace(write_llm(tmp_path / "code.csv"))
    assert [r.at_s for r in plan] == pytest.approx(LLM_OFFSETS, abs=1e-6)
    assert [r.prompt_tokens for r in plan] == [4808, 3180, 110, 2119, 7]
    assert [r.max_tokens for r in plan] == [10, 8, 1, 27, 300]  # 0 is sent as 1
    assert all(r.ignore_eos for r in plan)
    assert {r.function for r in plan} == {""}


def test_speedup_scales_the_relative_times(tmp_path: Path) -> None:
    path = write_llm(tmp_path / "t.csv")
    plan = read_trace(path, speedup=4.0)
    assert [r.at_s for r in plan] == pytest.approx([t / 4 for t in LLM_OFFSETS], abs=1e-6)
    assert [r.prompt_tokens for r in plan] == [r.prompt_tokens for r in read_trace(path)]
    slow = read_trace(path, speedup=0.5)
    assert [r.at_s for r in slow] == pytest.approx([t * 2 for t in LLM_OFFSETS], abs=1e-6)


def test_start_and_limit(tmp_path: Path) -> None:
    path = write_llm(tmp_path / "t.csv")
    plan = read_trace(path, start_s=4.4, limit=2)
    # rows at 4.570203 and 14.41941 are after 4.4 s; the first two of them, timed from 4.4 s
    assert [r.prompt_tokens for r in plan] == [2119, 7]
    assert [r.at_s for r in plan] == pytest.approx([4.570203 - 4.4, 14.41941 - 4.4], abs=1e-6)
    assert [r.prompt_tokens for r in read_trace(path, limit=3)] == [4808, 3180, 110]
    assert [r.at_s for r in read_trace(path, start_s=4.4, speedup=2)] == pytest.approx(
        [(4.570203 - 4.4) / 2, (14.41941 - 4.4) / 2], abs=1e-6
    )


def test_numeric_timestamps_and_any_column_order(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_text("GeneratedTokens,TIMESTAMP,ContextTokens,Extra\n5,100.5,10,x\n6,101.0,11,y\n7,103.25,12,z\n")
    plan = read_trace(path)
    assert [r.at_s for r in plan] == [0.0, 0.5, 2.75]
    assert [(r.prompt_tokens, r.max_tokens) for r in plan] == [(10, 5), (11, 6), (12, 7)]


def test_a_list_deals_a_function_less_trace_round_robin(tmp_path: Path) -> None:
    path = write_llm(tmp_path / "t.csv")
    assert [r.function for r in read_trace(path, functions=["a", "b"])] == ["a", "b", "a", "b", "a"]
    with pytest.raises(ValueError, match="no function names to map"):
        read_trace(path, functions={"x": "a"})


# -- mooncake -----------------------------------------------------------------------------------------


def test_mooncake_jsonl_milliseconds(tmp_path: Path) -> None:
    plan = read_trace(write_mooncake(tmp_path / "trace.jsonl"), speedup=2.0)
    assert [r.at_s for r in plan] == pytest.approx([0.0, 0.125, 1.5])
    assert [(r.prompt_tokens, r.max_tokens) for r in plan] == [(6955, 52), (6472, 26), (100, 5)]
    assert all(r.ignore_eos for r in plan)


def test_the_format_is_detected_from_the_content_not_the_name(tmp_path: Path) -> None:
    mooncake = write_mooncake(tmp_path / "trace.txt")
    llm = write_llm(tmp_path / "trace.data")
    assert read_trace(mooncake) == read_trace(mooncake, fmt="mooncake")
    assert read_trace(llm) == read_trace(llm, fmt="azure-llm")
    with pytest.raises(TraceError, match=r"trace\.data:1: not a JSON object"):
        read_trace(llm, fmt="mooncake")
    with pytest.raises(TraceError, match=r"trace\.txt:1: missing column TIMESTAMP"):
        read_trace(mooncake, fmt="azure-llm")
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        read_trace(llm, fmt="csv")


# -- azure-functions ----------------------------------------------------------------------------------


def test_azure_functions_spreads_each_minute_over_that_minute(tmp_path: Path) -> None:
    plan = replay_functions(write_functions(tmp_path / "invocations.csv"), functions=["a", "b", "c"])
    assert [r.at_s for r in plan] == sorted(r.at_s for r in plan)
    # each row is a function: per (function, minute) exactly the trace's count, inside that minute
    per_minute = Counter((r.function, int(r.at_s // 60)) for r in plan)
    expected = {
        (target, m): n
        for target, (_, counts) in zip("abc", FUNCTION_ROWS, strict=True)
        for m, n in enumerate(counts)
        if n
    }
    assert per_minute == expected
    assert len({r.at_s for r in plan}) == len(plan)  # spread, not stacked at the minute's start
    beta_minute_2 = [r.at_s for r in plan if r.function == "b" and 60 <= r.at_s < 120]
    assert max(beta_minute_2) - min(beta_minute_2) > 30  # 40 requests cover most of the minute
    assert {r.prompt_tokens for r in plan} == {64}
    assert {r.max_tokens for r in plan} <= set(range(5, 10))
    assert not any(r.ignore_eos for r in plan)


def test_azure_functions_spread_is_seeded(tmp_path: Path) -> None:
    path = write_functions(tmp_path / "invocations.csv")
    assert replay_functions(path, seed=1) == replay_functions(path, seed=1)
    assert [r.at_s for r in replay_functions(path, seed=1)] != [r.at_s for r in replay_functions(path, seed=2)]


def test_azure_functions_start_and_limit_keep_the_same_times(tmp_path: Path) -> None:
    path = write_functions(tmp_path / "invocations.csv")
    full = [r.at_s for r in replay_functions(path)]
    later = [r.at_s for r in replay_functions(path, start_s=90.0)]
    assert later == pytest.approx([t - 90.0 for t in full if t >= 90.0])
    assert [r.at_s for r in replay_functions(path, limit=4)] == full[:4]
    fast = [r.at_s for r in replay_functions(path, speedup=10.0)]
    assert fast == pytest.approx([t / 10 for t in full])


def test_a_dict_picks_and_maps_trace_functions(tmp_path: Path) -> None:
    path = write_functions(tmp_path / "invocations.csv")
    plan = replay_functions(path, functions={"f-alpha": "llama", "f-gamma": "qwen"})
    assert Counter(r.function for r in plan) == {"llama": 8, "qwen": 4}
    # rows beyond the list wrap round-robin; no mapping sends all to the one model
    assert Counter(r.function for r in replay_functions(path, functions=["x", "y"])) == {"x": 8 + 4, "y": 41}
    assert {r.function for r in replay_functions(path)} == {""}
    with pytest.raises(TraceError, match="the mapping names none of them"):
        replay_functions(path, functions={"nope": "x"})


def test_azure_functions_needs_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no token counts"):
        read_trace(write_functions(tmp_path / "invocations.csv"))


# -- the mapping's command-line form ------------------------------------------------------------------


def test_parse_functions(tmp_path: Path) -> None:
    assert parse_functions("a, b,c") == ["a", "b", "c"]
    (tmp_path / "map.json").write_text(json.dumps({"f-alpha": "llama"}))
    assert parse_functions(str(tmp_path / "map.json")) == {"f-alpha": "llama"}
    (tmp_path / "map.yaml").write_text("- llama\n- qwen\n")
    assert parse_functions(str(tmp_path / "map.yaml")) == ["llama", "qwen"]
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_functions(str(tmp_path / "bad.yaml"))
    (tmp_path / "num.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a list of names"):
        parse_functions(str(tmp_path / "num.json"))
    with pytest.raises(ValueError, match="cannot read"):
        parse_functions(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="not a comma-separated list"):
        parse_functions("a,,b")


# -- malformed traces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "line", "problem"),
    [
        ("t.csv", "TIMESTAMP,ContextTokens\n1,2\n", 1, "missing column GeneratedTokens"),
        (
            "t.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,lots,3\n",
            3,
            "ContextTokens: 'lots' is not a whole number",
        ),
        ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,2,-3\n", 3, "GeneratedTokens: -3 is negative"),
        ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,2\n", 3, "expected 3 fields, got 2"),
        (
            "t.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,2,3\n",
            2,
            "TIMESTAMP: 'yesterday' is not a date-time",
        ),
        (
            "t.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:50,2,3\n2023-11-16 18:15:49,2,3\n",
            3,
            "timestamp goes backwards",
        ),
        (
            "t.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:50,2,3\n12,2,3\n",
            3,
            "mixes numbers and date-times",
        ),
        ("t.csv", "when,prompt,output\n1,2,3\n", 1, "unknown trace format"),
        (
            "t.jsonl",
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 5, "output_length": 1}\n',
            2,
            "missing key input_length",
        ),
        (
            "t.jsonl",
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n\n{"timestamp": 5,\n',
            3,
            "not a JSON object",
        ),
        (
            "t.jsonl",
            '{"timestamp": 9, "input_length": 5, "output_length": 1}\n{"timestamp": 5, "input_length": 5, "output_length": 1}\n',
            2,
            "timestamp goes backwards",
        ),
        (
            "t.jsonl",
            '{"timestamp": "noon", "input_length": 5, "output_length": 1}\n',
            1,
            "not a number of milliseconds",
        ),
        (
            "t.jsonl",
            '{"timestamp": 1, "input_length": 5.5, "output_length": 1}\n',
            1,
            "input_length: 5.5 is not a whole number",
        ),
        (
            "f.csv",
            "HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f,http,1,x\n",
            2,
            "minute 2: 'x' is not a whole number",
        ),
        ("f.csv", "HashOwner,HashApp,HashFunction,Trigger,1,2,4\no,a,f,http,1,2,3\n", 1, "column 4 follows a gap"),
        ("f.csv", "HashOwner,HashApp,HashFunction,2\no,a,f,1\n", 1, "missing column Trigger"),
    ],
)
def test_malformed_traces_name_the_file_the_line_and_the_problem(
    tmp_path: Path, name: str, text: str, line: int, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError) as caught:
        read_trace(path, prompt=Fixed(1), output=Fixed(1))
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert problem in str(caught.value)
    assert caught.value.line == line and caught.value.path == path


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty file"),
        ("\n\n", "empty file"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests to replay"),
    ],
)
def test_empty_traces(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=problem) as caught:
        read_trace(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_unreadable_traces(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "missing.csv")
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceError, match="not UTF-8"):
        read_trace(binary)


def test_start_past_the_end_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"no requests to replay \(start_s=100\)"):
        read_trace(write_llm(tmp_path / "t.csv"), start_s=100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"speedup": 0}, "speedup: must be a number above 0"),
        ({"speedup": float("nan")}, "speedup: must be a number above 0"),
        ({"limit": 0}, "limit: must be a whole number of at least 1"),
        ({"start_s": -1}, "start_s: must be a number of seconds"),
        ({"functions": "a,b"}, "not one string"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_trace(write_llm(tmp_path / "t.csv"), **kwargs)  # type: ignore[arg-type]
