"""Records: identity, validation, and a lossless Parquet round trip of every type."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mathmill.codec import arrow_schema, from_table, to_json_lines, to_table
from mathmill.records import (
    RECORD_TYPES,
    Attempt,
    Critique,
    CritiqueExample,
    CuratedRow,
    Dropped,
    ErrorInfo,
    ExecutionResult,
    FormalLemma,
    FormalReasoning,
    GenChoice,
    Generation,
    GenRequest,
    Goal,
    Label,
    MergedProblem,
    ModelTally,
    Problem,
    PromptRef,
    ProofState,
    Record,
    Sample,
    SamplingParams,
    SolutionRow,
    Structure,
    TokenLogprob,
    TokenUsage,
    Topic,
    Turn,
    Verdict,
)
from mathmill.storage import RunStore

WHEN = datetime(2026, 11, 22, 3, 4, 5, 123456, tzinfo=UTC)
EXEC = ExecutionResult(
    status="timeout",
    stdout="partial\n",
    stderr="Killed",
    stdout_truncated=True,
    exit_code=-9,
    wall_ms=5000.5,
    cpu_ms=4990.25,
    peak_memory_kb=123456,
    backend="local",
)


def full_examples() -> dict[str, Record]:
    """One instance of every record type with every field set to a non-default value."""
    prompt = PromptRef(template_id="long_cot", sha256="ab" * 32)
    problem = Problem(
        statement="Find $x$ if $2x+3=7$.\n\nGive x.",
        answer="2",
        solution="2x=4, so x=2",
        source="unit",
        source_id="u-1",
        license="MIT",
        topic="linear equations",
        domain="algebra",
        model="generator",
        prompt=prompt,
        usage=TokenUsage(prompt_tokens=3, completion_tokens=4),
        created_at=WHEN,
        metadata={"nested": {"list": [1, 2.5, "x", None, True]}, "empty": {}, "unicode": "√π"},
    )
    attempt = Attempt(
        problem_id=problem.id,
        kind="tir",
        model="smollm2",
        sampling=SamplingParams(
            temperature=0.7,
            top_p=0.95,
            max_tokens=512,
            n=4,
            seed=7,
            stop=["</python>"],
            logprobs=True,
            top_logprobs=3,
        ),
        prompt=prompt,
        sample_index=3,
        round=2,
        parent_id="parent-attempt",
        text="Let me compute. \\boxed{2}",
        final_answer="2",
        draft_code="print(1+1)",
        code="print(2)",
        leak_score=0.25,
        step_prompts={"synth_code": "cd" * 32},
        step_models={"coder": "c"},
        execution=EXEC,
        verdict=Verdict(status="verified", expected="2", predicted="2", rule="int", reason="same"),
        critique=Critique(
            summary="fine",
            issues=["no edge case"],
            scores={"rigor": 0.5, "alignment": 1.0},
            passed=True,
            model="critic",
            error=ErrorInfo(kind="invalid_json", message="bad", stage="critique", status=None),
        ),
        turns=[
            Turn(role="system", content="sys"),
            Turn(role="assistant", content="<python>print(2)</python>"),
            Turn(role="tool", content="<repl>2</repl>", execution=EXEC),
        ],
        usage=TokenUsage(prompt_tokens=100, completion_tokens=50),
        latency_ms=12.5,
        error=ErrorInfo(kind="status", message="slow", stage="verify", attempts=3, status=503),
        created_at=WHEN,
        metadata={"k": [{"a": 1}]},
    )
    label = Label(
        target_id=problem.id,
        name="difficulty",
        value="hard",
        score=0.25,
        source="ladder",
        reason="2/8 solved",
        created_at=WHEN,
        metadata={"models": ["a", "b"]},
    )
    topic = Topic(text="Modular arithmetic", domain="number theory", model="g", prompt=prompt)
    dropped = Dropped(
        stage="problems",
        reason="duplicate",
        detail="same as 0123",
        target_id=problem.id,
        record_type="Problem",
        record=problem.model_dump(mode="json"),
        created_at=WHEN,
    )
    row = SolutionRow(
        id=attempt.id,
        problem_id=problem.id,
        problem=problem.statement,
        topic="t",
        domain="d",
        cot_type="long_cot",
        solution="x=2 \\boxed{2}",
        final_answer="2",
        code="print(2)",
        computed_answer="2",
        blind_answer="2",
        status="verified",
        reason="same",
        rounds=1,
        lineage=["a", "b"],
        model="m",
        prompts={"synth_long_cot": "ab" * 32},
        prompt_tokens=5,
        completion_tokens=6,
        created_at=WHEN,
    )
    examples: dict[str, Record] = {
        "Problem": problem,
        "Topic": topic,
        "Dropped": dropped,
        "SolutionRow": row,
        "Attempt": attempt,
        "Label": label,
        "Verdict": attempt.verdict,  # type: ignore[dict-item]
        "Critique": attempt.critique,  # type: ignore[dict-item]
        "ExecutionResult": EXEC,
        "Turn": attempt.turns[2],
        "TokenUsage": attempt.usage,
        "SamplingParams": attempt.sampling,
        "PromptRef": prompt,
        "ErrorInfo": attempt.error,  # type: ignore[dict-item]
    }
    token = TokenLogprob(token=" x", token_id=42, logprob=-0.25, top={" x": -0.25, " y": -1.5})
    choice = GenChoice(
        index=1,
        text="x = 2",
        finish_reason="length",
        tokens=3,
        cumulative_logprob=-0.75,
        logprobs=[token, token, token],
    )
    examples["GenRequest"] = GenRequest(
        id="r-1",
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "√π?"}],
        sampling=attempt.sampling,
        prompt_logprobs=2,
        json_schema={"type": "object", "properties": {"a": {"enum": [1, "b", None]}}},
        metadata={"problem_id": problem.id, "k": [1, 2]},
    )
    examples["Generation"] = Generation(
        id="r-1",
        model="smollm2",
        backend="vllm",
        choices=[choice],
        prompt_logprobs=[token],
        usage=TokenUsage(prompt_tokens=9, completion_tokens=3),
        error=attempt.error,
        metadata={"k": "v"},
        created_at=WHEN,
    )
    examples["GenChoice"] = choice
    examples["TokenLogprob"] = token
    examples["Sample"] = Sample(
        id="s-1",
        problem_id=problem.id,
        problem=problem.statement,
        reference="2",
        index=3,
        text="so \\boxed{2}",
        final_answer="2",
        status="correct",
        reason="exact",
        finish_reason="stop",
        tokens=3,
        logprob_sum=-0.75,
        logprob_mean=-0.25,
        logprobs=[token],
        model="smollm2",
        backend="http",
        sampling=attempt.sampling,
        prompt=prompt,
        rung="small",
        generator="small-hot",
        created_at=WHEN,
    )
    examples["MergedProblem"] = MergedProblem(
        id=problem.id,
        position=7,
        problem=problem.statement,
        reference="2",
        source="unit",
        models={
            "a": ModelTally(right=1, wrong=2, ungraded=1, pass_rate=0.333333, flag="mixed"),
            "b": ModelTally(right=0, wrong=0, ungraded=4, flag="ungraded"),
        },
        pass_rate=0.333333,
        kept=True,
        reason="mixed",
        examples=2,
        created_at=WHEN,
    )
    examples["CritiqueExample"] = CritiqueExample(
        id="c-1",
        problem_id=problem.id,
        position=7,
        question=problem.statement,
        solution="so \\boxed{3}",
        ground_truth="2",
        final_answer="3",
        target="wrong",
        model="a",
        served_model="smollm2",
        sample_id="s-1",
        sample_index=3,
        source="unit",
        data_source="unit_critique",
        prompt="Check: ...",
        prompt_ref=prompt,
        critique="It adds wrongly.\nConclusion: wrong [END]",
        teacher_conclusion="wrong",
        teacher_model="teacher",
        created_at=WHEN,
    )
    structure = Structure(
        domain="algebra",
        subdomain="linear equations",
        objects=["reals"],
        constraints=["x real"],
        answer_type="integer",
        reasoning_patterns=["isolate x"],
        case_analysis=True,
        construction=True,
        techniques=["subtraction"],
        depth=2,
        model="labeler",
    )
    examples["Structure"] = structure
    examples["CuratedRow"] = CuratedRow(
        id=problem.id,
        problem=problem.statement,
        original_problem="Find  $x$ if $2x + 3 = 7$.",
        answer="2",
        original_answer="2.0",
        source="unit",
        source_id="u-1",
        license="MIT",
        domain="algebra",
        cluster_id="c-1",
        code="x = (7 - 3) / 2\nprint(int(x))",
        computed_answer="2",
        rounds=1,
        sample_index=2,
        samples_solved=2,
        samples=3,
        lineage=["a", "b"],
        model="m",
        leak_flagged=True,
        leak_verdict="cleared",
        leak_reason="the constant is stated",
        prompt_tokens=5,
        completion_tokens=6,
        computation_buckets={"small": [0, 4], "large": [3, 4]},
        bucket="large",
        ladder_tokens=40,
        difficulty=0.7,
        difficulty_raw=1.2,
        difficulty_se=0.4,
        difficulty_method="rasch",
        domain_heuristic="algebra",
        domain_confidence=0.9,
        structure=structure,
        split="test",
        metadata={"k": [1, 2]},
        created_at=WHEN,
    )
    goal = Goal(hypotheses=["n : nat", "IH : n + 0 = n"], conclusion="S n + 0 = S n")
    examples["Goal"] = goal
    examples["ProofState"] = ProofState(goals=[goal, Goal(conclusion="True")])
    reasoning = FormalReasoning(
        index=1,
        text="Induct on n.",
        model="m",
        score=0.25,
        logprob_with=-1.5,
        scored_by="s",
        verdict="pass",
        verdict_reason="explains the idea",
    )
    examples["FormalReasoning"] = reasoning
    examples["FormalLemma"] = FormalLemma(
        id="l",
        name="addn0",
        kind="Lemma",
        module="mathcomp.ssreflect.ssrnat",
        file="ssrnat.v",
        line=12,
        start=100,
        end=180,
        statement="Lemma addn0 : right_id 0 addn.",
        proof="Proof. by move=> n; apply/eqP; elim: n. Qed.",
        tactics=["move=> n.", "by elim: n."],
        terminator="Qed.",
        notations=['Notation "n .+1" := (succn n).'],
        premises=["mathcomp.ssreflect.ssrnat.addn"],
        states=[ProofState(goals=[goal]), ProofState()],
        statement_tokens=9,
        proof_tokens=20,
        tactic_tokens=8,
        tokenizer="cl100k_base",
        reasonings=[reasoning, FormalReasoning(index=0, text="")],
        chosen=1,
        metadata={"root": "/x", "pick": 0},
        created_at=WHEN,
    )
    assert set(examples) == set(RECORD_TYPES), "every record type needs an example"
    return examples


def minimal_examples() -> dict[str, Record]:
    """The same types with only required fields (None / empty nested values)."""
    return {
        "Problem": Problem(statement="x"),
        "Attempt": Attempt(problem_id="p", kind="code"),
        "Label": Label(target_id="t", name="n", value="v"),
        "Verdict": Verdict(status="failed"),
        "Critique": Critique(summary=""),
        "ExecutionResult": ExecutionResult(status="ok"),
        "Turn": Turn(role="user", content=""),
        "TokenUsage": TokenUsage(),
        "SamplingParams": SamplingParams(),
        "PromptRef": PromptRef(template_id="t", sha256="0" * 64),
        "ErrorInfo": ErrorInfo(kind="k", message=""),
        "GenRequest": GenRequest(id="r", prompt=""),
        "Generation": Generation(id="r"),
        "GenChoice": GenChoice(index=0, text=""),
        "TokenLogprob": TokenLogprob(token="", logprob=0.0),
        "Sample": Sample(id="s", problem_id="p", problem="x", index=0, text="", status="error"),
        "MergedProblem": MergedProblem(id="p", position=0, problem="x", kept=False, reason=""),
        "CritiqueExample": CritiqueExample(
            id="c",
            problem_id="p",
            position=0,
            question="x",
            solution="",
            target="right",
            model="m",
            sample_id="s",
            sample_index=0,
            data_source="d",
            prompt="",
        ),
        "Structure": Structure(),
        "Goal": Goal(conclusion=""),
        "ProofState": ProofState(),
        "FormalReasoning": FormalReasoning(index=0, text=""),
        "FormalLemma": FormalLemma(
            id="l", name="n", module="m", file="f", line=1, statement="", proof=""
        ),
        "CuratedRow": CuratedRow(
            id="p", problem="x", original_problem="x", answer="1", original_answer="1", code=""
        ),
    }


def test_problem_id_is_stable_under_whitespace_and_unicode_forms() -> None:
    a = Problem(statement="Find  x\u00a0if x+1=2.")
    b = Problem(statement=" Find x if x+1=2.\n")
    assert a.id == b.id
    assert len(a.id) == 16
    assert Problem(statement="Find X if X+1=2.").id != a.id


def test_attempt_id_depends_on_sample_round_and_prompt() -> None:
    base = {"problem_id": "p", "kind": "long_cot", "model": "m"}
    ids = {
        Attempt(**base).id,
        Attempt(**base, sample_index=1).id,
        Attempt(**base, round=1).id,
        Attempt(**base, prompt=PromptRef(template_id="t", sha256="1" * 64)).id,
    }
    assert len(ids) == 4
    assert Attempt(**base).id == Attempt(**base).id


def test_records_reject_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Problem(statement="x", answr="2")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="kind"):
        Attempt(problem_id="p", kind="essay")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="statement"):
        Problem(statement="")
    with pytest.raises(ValidationError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("examples", [full_examples, minimal_examples], ids=["full", "minimal"])
def test_every_record_type_round_trips_through_parquet(examples: object, store: RunStore) -> None:
    for name, record in examples().items():  # type: ignore[operator]
        ref = store.dataset(name.lower()).write_chunk("00000", [record, record])
        assert ref.record_type == name
        back = store.dataset(name.lower()).read_chunk(ref)
        assert back == [record, record], name
        assert type(back[0]) is type(record)
        assert back[0].model_dump() == record.model_dump()
        # the JSONL export's fast way writes what the record's own JSON is
        table = store.dataset(name.lower()).read_table(ref)
        assert to_json_lines(table, type(record)) == [record.model_dump_json().encode()] * 2


def test_nested_fields_are_real_columns_not_blobs() -> None:
    schema = arrow_schema(Attempt)
    assert str(schema.field("execution").type).startswith("struct<status: string")
    assert str(schema.field("turns").type).startswith("list<item: struct<role")
    assert str(schema.field("critique").type.field("scores").type) == "map<string, double>"
    assert str(schema.field("created_at").type) == "timestamp[us, tz=UTC]"
    # Free-form JSON is the only thing stored as a string.
    assert str(schema.field("metadata").type) == "string"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(
    statement=st.text(min_size=1, max_size=200).filter(str.strip),
    answer=st.none() | st.text(max_size=30),
    metadata=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    scores=st.dictionaries(
        st.text(max_size=10), st.floats(allow_nan=False, allow_infinity=False), max_size=4
    ),
)
def test_round_trip_of_arbitrary_values(
    statement: str, answer: str | None, metadata: dict[str, object], scores: dict[str, float]
) -> None:
    problem = Problem(statement=statement, answer=answer, metadata=metadata)  # type: ignore[arg-type]
    attempt = Attempt(
        problem_id=problem.id,
        kind="short_cot",
        text=statement,
        critique=Critique(summary=answer or "", scores=scores),
        metadata=metadata,  # type: ignore[arg-type]
    )
    assert from_table(to_table([problem], Problem), Problem) == [problem]
    assert from_table(to_table([attempt], Attempt), Attempt) == [attempt]
    for record in (problem, attempt):
        lines = to_json_lines(to_table([record], type(record)), type(record))
        assert lines == [record.model_dump_json().encode()]
