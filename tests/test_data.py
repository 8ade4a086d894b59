"""Tests for emolib.data: known-answer fixtures (well-formed and malformed), split properties, and real-data counts.

Fixtures live in `tests/fixtures/data/<case>/<dataset>/`; each `<case>` folder is a valid `EMOLIB_DATA_DIR`.
Real-data tests are marked `realdata` and run only when `EMOLIB_DATA_DIR` is set.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from emolib import data
from emolib.cache import project_root
from emolib.data.schema import FEATURES

FIXTURES = Path(__file__).parent / "fixtures" / "data"
GOOD = FIXTURES / "good"
EXTERNAL = ["isear", "meld", "goemotions", "carer_emotion", "wikitext-2-raw"]
EMOTION_EXTERNAL = ["isear", "meld", "goemotions", "carer_emotion"]

REAL_DIR = os.environ.get(data.DATA_DIR_ENV)


def realdata(test):
    """Mark a test as needing the shared datasets; skipped when EMOLIB_DATA_DIR is unset."""
    skip = pytest.mark.skipif(not REAL_DIR, reason=f"{data.DATA_DIR_ENV} is not set")
    return pytest.mark.realdata(skip(test))


@pytest.fixture
def builtin_fixture(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point `builtin` at the fixture CSV (uneven label counts: 7, 3, 5, 11, 4, 6, 9)."""
    folder = GOOD / "builtin"
    monkeypatch.setattr(data.registry, "RESOURCES_DIR", folder)
    return folder


def load_good(name: str, **kwargs) -> tuple:
    return data.load_with_report(name, data_dir=GOOD, **kwargs)


def ids_by_split(ds) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row_id, split in zip(ds["id"], ds["split"], strict=True):
        out.setdefault(split, []).append(row_id)
    return out


def counts(ds) -> Counter[tuple[str, str]]:
    return Counter(zip(ds["split"], ds["label"], strict=True))


# ----------------------------------------------------------------------------------------------- registry, labels


def test_registry_names_kinds_and_citations():
    assert list(data.DATASETS) == ["builtin", *EMOTION_EXTERNAL, "crowd_envent", "wikitext-2-raw"]
    assert {n: s.bibtex for n, s in data.DATASETS.items()} == {
        "builtin": None,
        "isear": "scherer1994isear",
        "meld": "poria2019meld",
        "goemotions": "demszky2020goemotions",
        "carer_emotion": "saravia2018carer",
        "crowd_envent": "troiano2023crowdenvent",
        "wikitext-2-raw": "merity2016wikitext",
    }
    assert data.DATASETS["wikitext-2-raw"].kind == "lm"
    assert all(data.DATASETS[n].kind == "emotion" for n in ["builtin", *EMOTION_EXTERNAL, "crowd_envent"])
    for spec in data.DATASETS.values():
        assert all(label in data.CANONICAL_LABELS for label in spec.labels)
        assert spec.official_splits == (spec.default_split is None)
    assert data.DEFAULT_DATASET == "builtin"
    assert list(data.dataset_table().index) == list(data.DATASETS)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("happiness", "joy"),
        ("Happy", "joy"),
        ("sad", "sadness"),
        ("angry", "anger"),
        ("fearful", "fear"),
        ("scared", "fear"),
        ("disgusted", "disgust"),
        ("surprised", "surprise"),
        ("no emotion", "neutral"),
        ("No_Emotion", "neutral"),
        ("neutral", "neutral"),
        ("shame", "shame"),
        ("guilt", "guilt"),
        ("love", "love"),
        ("contempt", None),
    ],
)
def test_canonical_label(raw, canonical):
    assert data.canonical_label(raw) == canonical


def test_label_table_is_the_alias_dict():
    table = data.label_table()
    assert dict(zip(table["spelling"], table["canonical"], strict=True)) == data.LABEL_ALIASES
    assert set(table["canonical"]) == set(data.CANONICAL_LABELS)
    assert all(label == label.lower() for label in table["canonical"])
    assert table.set_index("spelling").loc["love", "datasets"] == "carer_emotion"


# ----------------------------------------------------------------------------------------------- schema, loaders


@pytest.mark.parametrize("name", EXTERNAL)
def test_fixture_schema(name):
    ds, report = load_good(name)
    assert tuple(ds.column_names) == data.COLUMNS
    assert all(ds.features[c].dtype == "string" for c in data.COLUMNS)
    assert set(ds["dataset"]) == {name}
    assert set(ds["split"]) <= set(data.SPLITS)
    assert all(text == text.strip() and text for text in ds["text"])
    assert len(set(ds["id"])) == len(ds)
    assert report.rows_kept == len(ds)
    assert report.rows_read == report.rows_kept + sum(report.skips.values())


def test_isear_pipe_text_reconstructs_exactly():
    ds, report = load_good("isear")
    rows = {r["id"]: r for r in ds}
    assert len(ds) == 15
    assert rows["0110063"]["text"] == 'A |quoted\\" phrase| and á more|text|end'
    assert rows["0110063"]["label"] == "shame"
    assert rows["0110061"]["text"] == "When I forgot a friend's name |at a party|."
    assert rows["0110032"]["text"] == "Someone cut in front of me in the queue."
    assert set(ds["label"]) == {"joy", "fear", "anger", "sadness", "disgust", "shame", "guilt"}
    assert report.skips == {}


def test_meld_official_splits_ids_and_text():
    ds, _ = load_good("meld")
    assert Counter(ds["split"]) == {"train": 5, "dev": 3, "test": 2}
    rows = {r["id"]: r for r in ds}
    assert rows["train-dia0-utt2"]["text"] == "Oh my God, you guys, that's great!"
    assert rows["train-dia0-utt0"]["text"] == "also I was the point person on my company’s transition."
    assert rows["dev-dia2-utt0"]["label"] == "surprise"


def test_goemotions_multilabel_rows_are_counted_skips():
    ds, report = load_good("goemotions")
    assert Counter(ds["split"]) == {"train": 4, "dev": 2, "test": 2}
    assert report.skips == {data.MULTI_LABEL: 3}
    assert report.skipped == {("train", data.MULTI_LABEL): 2, ("dev", data.MULTI_LABEL): 1}
    assert report.rows_read == 11
    rows = {r["id"]: r for r in ds}
    assert rows["eebbqej"] == {
        "text": 'My favourite "food" is anything I didn\'t cook.',
        "label": "neutral",
        "dataset": "goemotions",
        "split": "train",
        "id": "eebbqej",
    }
    assert "ed1aaaa" not in rows
    frame = report.as_frame()
    assert frame.loc[("skipped", data.MULTI_LABEL), "train"] == 2
    assert frame.loc[("skipped", data.MULTI_LABEL), "total"] == 3
    assert frame.loc[("label", "neutral"), "test"] == 1


def test_carer_blank_line_is_counted_and_val_is_dev():
    ds, report = load_good("carer_emotion")
    assert Counter(ds["split"]) == {"train": 6, "dev": 2, "test": 2}
    assert report.skips == {data.BLANK_LINE: 1}
    assert report.skipped == {("dev", data.BLANK_LINE): 1}
    assert report.read == {"train": 6, "dev": 3, "test": 2}
    assert "dev-line2" in ds["id"]
    assert "love" in ds["label"] and "disgust" not in ds["label"]


def test_builtin_format_and_default(builtin_fixture):
    ds, report = data.load_with_report()
    assert len(ds) == 45
    assert set(ds["dataset"]) == {"builtin"}
    rows = {r["id"]: r for r in ds}
    assert rows["builtin-joy-01"]["text"] == 'She said "we won", and everyone cheered.'
    assert rows["builtin-anger-03"]["text"] == "A anger text number 3, with a comma"
    assert report.as_frame().loc[("rows", "read"), "total"] == 45


def test_packaged_builtin_loads():
    if not (data.registry.RESOURCES_DIR / data.readers.BUILTIN_FILE).is_file():
        pytest.skip("emolib/resources/builtin_emotions.csv is not written yet")
    ds = data.load("builtin")
    assert len(ds) == 350
    assert Counter(ds["label"]) == dict.fromkeys(data.EKMAN7, 50)
    assert set(counts(ds).values()) == {30, 10}
    assert Counter(ds["split"]) == {"train": 210, "dev": 70, "test": 70}


def test_wikitext_articles_are_whole_and_titles_exact():
    ds, _ = load_good("wikitext-2-raw")
    assert len(ds) == 10
    assert set(ds["label"]) == {""}
    assert ds["id"][3] == "constant-k-filter"
    assert ds["id"][8] == "battle-of-durenstein"
    assert ds["id"][0] == "topic-1-example"
    # formula fragments and table legends with a title's shape stay inside their article
    assert "= 1 rad / s and a nominal impedance k =" in ds["text"][3]
    assert "= Qualified for the next round" in ds["text"][6]
    assert all(text.startswith("= ") for text in ds["text"])
    # never an article across splits: every non-blank line lands in exactly one article, in order
    lines = (GOOD / "wikitext-2-raw" / "test.txt").read_text(encoding="utf-8").splitlines()
    assert [line.strip() for line in lines if line.strip()] == "\n".join(ds["text"]).split("\n")
    assert Counter(ds["split"]) == {"train": 7, "dev": 2, "test": 1}
    for split in data.SPLITS:
        assert data.wikitext_articles(split, data_dir=GOOD) == list(data.select_split(ds, split)["text"])


# ----------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("name", ["isear", "wikitext-2-raw"])
def test_seeded_split_is_deterministic_and_seed_dependent(name):
    first = ids_by_split(data.load(name, data_dir=GOOD))
    again = ids_by_split(data.load(name, data_dir=GOOD))
    default = data.DATASETS[name].default_split
    other = ids_by_split(data.load(name, data_dir=GOOD, split=data.SplitConfig(*default.fractions, seed=1)))
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    "config",
    [data.SplitConfig(), data.SplitConfig(0.5, 0.25, 0.25, seed=3), data.SplitConfig(0.8, 0.1, 0.1, seed=7)],
)
def test_split_is_stratified_within_one_row(builtin_fixture, config):
    ds = data.load("builtin", split=config)
    per_label = Counter(ds["label"])
    got = counts(ds)
    for label, n in per_label.items():
        for split, fraction in zip(data.SPLITS, config.fractions, strict=True):
            assert abs(got[(split, label)] - n * fraction) < 1, (split, label)


def test_split_ignores_row_order():
    ids = [f"row-{i}" for i in range(200)]
    labels = [random.Random(0).choice("abc") for _ in ids]
    config = data.SplitConfig(seed=5)
    expected = dict(zip(ids, data.seeded_split(ids, labels, config), strict=True))
    order = list(range(200))
    random.Random(1).shuffle(order)
    shuffled = data.seeded_split([ids[i] for i in order], [labels[i] for i in order], config)
    assert dict(zip([ids[i] for i in order], shuffled, strict=True)) == expected


@pytest.mark.parametrize("name", EXTERNAL)
def test_no_id_in_two_splits(name):
    by_split = ids_by_split(data.load(name, data_dir=GOOD))
    seen = [row_id for ids in by_split.values() for row_id in set(ids)]
    assert len(seen) == len(set(seen))


def test_split_config_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        data.SplitConfig(0.6, 0.3, 0.3)
    with pytest.raises(ValueError, match="official splits"):
        data.load("meld", data_dir=GOOD, split=data.SplitConfig())


# ----------------------------------------------------------------------------------------------- bad input


def test_missing_data_dir_names_the_variable(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(data.EmolibDataError, match="EMOLIB_DATA_DIR is not set") as error:
        data.load("isear")
    assert "isear/ with isear.csv" in str(error.value)


def test_missing_folder_names_path_variable_and_contents(tmp_path):
    with pytest.raises(data.EmolibDataError) as error:
        data.load("meld", data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path.resolve() / "meld") in message
    assert "EMOLIB_DATA_DIR" in message and "train_sent_emo.csv" in message


def test_missing_file_names_path_and_variable():
    with pytest.raises(data.EmolibDataError) as error:
        data.load("carer_emotion", data_dir=FIXTURES / "carer_missing_file")
    message = str(error.value)
    assert str((FIXTURES / "carer_missing_file" / "carer_emotion" / "test.txt").resolve()) in message
    assert "EMOLIB_DATA_DIR" in message


@pytest.mark.parametrize(
    ("case", "name", "file", "line", "expected"),
    [
        ("isear_field_count", "isear", "isear.csv", 5, "expected at least 43 '|'-separated fields"),
        ("isear_bad_header", "isear", "isear.csv", 1, "header lacks column(s) ['SIT']"),
        ("carer_field_count", "carer_emotion", "train.txt", 2, "exactly one ';'"),
        ("carer_bad_encoding", "carer_emotion", "train.txt", 2, "cannot decode"),
        ("meld_bad_quoting", "meld", "train_sent_emo.csv", 4, "malformed CSV"),
        ("goemotions_bad_label_id", "goemotions", "test.tsv", 2, "label ids '9'"),
        ("wikitext_no_title", "wikitext-2-raw", "test.txt", 1, "start with an article title"),
        (
            "goemotions_duplicate_id",
            "goemotions",
            "dev.tsv",
            2,
            "'eebbqej' already used at train.tsv, line 1",
        ),
    ],
)
def test_malformed_row_names_file_and_line(case, name, file, line, expected):
    with pytest.raises(data.EmolibDataError) as error:
        data.load(name, data_dir=FIXTURES / case)
    message = str(error.value)
    assert f"{file}, line {line}:" in message
    assert expected in message


def test_builtin_missing_column(monkeypatch):
    monkeypatch.setattr(data.registry, "RESOURCES_DIR", FIXTURES / "builtin_missing_column" / "builtin")
    with pytest.raises(
        data.EmolibDataError, match=r"builtin_emotions.csv, line 1: header lacks column\(s\) \['label'\]"
    ):
        data.load()


@pytest.mark.parametrize(
    ("case", "name", "where", "reason", "kept"),
    [
        ("carer_empty_text", "carer_emotion", "train.txt, line 3: empty text", data.EMPTY_TEXT, 9),
        (
            "meld_unknown_label",
            "meld",
            "dev_sent_emo.csv, line 3: unknown label 'contempt'",
            data.UNKNOWN_LABEL,
            9,
        ),
    ],
)
def test_bad_row_raises_or_is_a_counted_skip(case, name, where, reason, kept):
    with pytest.raises(data.EmolibDataError, match="on_bad_row='skip'") as error:
        data.load(name, data_dir=FIXTURES / case)
    assert where in str(error.value)
    ds, report = data.load_with_report(name, data_dir=FIXTURES / case, on_bad_row="skip")
    assert len(ds) == kept
    assert report.skips[reason] == 1
    assert where.split(":")[0] in report.examples[0]


def test_bad_arguments():
    with pytest.raises(data.EmolibDataError, match="unknown dataset 'nope'"):
        data.load("nope")
    with pytest.raises(ValueError, match="on_bad_row"):
        data.load("isear", data_dir=GOOD, on_bad_row="ignore")


# ----------------------------------------------------------------------------------------------- Crowd-enVENT
# No public copy can ship (not with emolib, not in the shared data): the tests write the file themselves, with the
# generation file's layout (tab-separated, header, appraisal columns the loader ignores).

CROWD_HEADER = ["text_id", "temporal_distance", "generated_text", "hidden_emo_text", "emotion", "suddenness"]


def write_crowd_envent(root: Path, rows: list[list[str]], header: list[str] = CROWD_HEADER) -> Path:
    folder = root / "crowd_envent"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header), *("\t".join(row) for row in rows)]
    (folder / "crowd-enVent_generation.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def crowd_rows(per_label: int = 5) -> list[list[str]]:
    labels = ["joy", "sadness", "anger", "fear", "disgust", "surprise", "no-emotion", "relief", "guilt", "shame",
              "trust", "pride", "boredom"]  # fmt: skip
    return [
        [f"{i:03d}{j}", "days", f"I felt {label} when event {j} happened.", "I felt ... when", label, "3"]
        for i, label in enumerate(labels)
        for j in range(per_label)
    ]


def test_crowd_envent_reads_the_generation_file(tmp_path):
    rows = crowd_rows()
    rows.append(["quote1", "days", 'My friend said "congrats" after the exam.', "x", "joy", "4"])
    rows.insert(3, ["", "", "", "", "", ""])  # a blank record is skipped and counted
    ds, report = data.load_with_report("crowd_envent", data_dir=write_crowd_envent(tmp_path, rows))
    assert len(ds) == 13 * 5 + 1
    assert set(ds["label"]) == set(data.DATASETS["crowd_envent"].labels)
    by_id = {r["id"]: r for r in ds}
    assert by_id["0060"]["label"] == "neutral"  # "no-emotion"
    assert by_id["0000"]["text"] == "I felt joy when event 0 happened."  # generated_text, not hidden_emo_text
    assert by_id["quote1"]["text"] == 'My friend said "congrats" after the exam.'
    assert set(ds["split"]) == {"train", "dev", "test"}  # no official split: emolib's seeded one
    assert sum(report.skips.values()) == 1
    assert data.available_datasets(tmp_path) == ["builtin", "crowd_envent"]


@pytest.mark.parametrize(
    ("rows", "header", "match"),
    [
        (crowd_rows(1) + [["x1", "days", "text", "x", "joy"]], CROWD_HEADER, r"line 15: expected 6 tab-separated"),
        (crowd_rows(1) + [["x1", "days", "text", "x", "contempt", "1"]], CROWD_HEADER, r"line 15: unknown label 'contempt'"),
        (crowd_rows(1) + [["0000", "days", "again", "x", "joy", "1"]], CROWD_HEADER, r"line 15: id '0000' already used"),
        (crowd_rows(1), ["text_id", "text", "emotion", "a", "b", "c"], r"line 1: header lacks column\(s\) \['generated_text'\]"),
    ],
)  # fmt: skip
def test_crowd_envent_bad_rows_name_the_file_and_line(tmp_path, rows, header, match):
    root = write_crowd_envent(tmp_path, rows, header)
    with pytest.raises(data.EmolibDataError, match=r"crowd-enVent_generation\.tsv, " + match):
        data.load("crowd_envent", data_dir=root)


def test_crowd_envent_missing_folder_says_where_to_put_it(tmp_path):
    with pytest.raises(
        data.EmolibDataError, match=r"crowd_envent does not exist.*crowd-enVent_generation\.tsv"
    ):
        data.load("crowd_envent", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- locations


def test_data_dir_and_available_datasets(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.data_dir() is None
    assert data.available_datasets() == ["builtin"]
    monkeypatch.setenv(data.DATA_DIR_ENV, "tests/fixtures/data/good")
    assert data.data_dir() == project_root() / "tests/fixtures/data/good"
    assert data.available_datasets() == ["builtin", *EXTERNAL]
    assert len(data.load("isear")) == 15
    assert data.available_datasets(FIXTURES / "carer_empty_text") == ["builtin", "carer_emotion"]


# ----------------------------------------------------------------------------------------------- run helpers


def test_restrict_labels_counts_exclusions():
    ds = data.load("isear", data_dir=GOOD)
    kept, excluded = data.restrict_labels(ds, data.EKMAN7)
    assert set(kept["label"]) == {"joy", "fear", "anger", "sadness", "disgust"}
    assert len(kept) == 10
    assert set(excluded.index) == {"shame", "guilt"}
    assert excluded.loc["shame"].sum() == 3 and excluded.loc["guilt"].sum() == 2
    assert excluded.to_numpy().sum() + len(kept) == len(ds)
    assert list(excluded.columns) == [s for s in data.SPLITS if s in set(ds["split"])]


def test_restrict_labels_per_split_and_aliases():
    ds = data.load("goemotions", data_dir=GOOD)
    kept, excluded = data.restrict_labels(ds, ["Angry", "disgusted", "fear", "happiness", "sad", "surprise"])
    assert "neutral" not in kept["label"]
    assert excluded.loc["neutral"].to_dict() == {"train": 1, "dev": 0, "test": 1}
    _, nothing = data.restrict_labels(ds, data.EKMAN7)
    assert nothing.empty
    with pytest.raises(data.EmolibDataError, match="unknown label 'contempt'"):
        data.restrict_labels(ds, ["joy", "contempt"])


def test_stratified_subsample_takes_all_when_short(builtin_fixture):
    ds = data.load()
    sample, table = data.stratified_subsample(ds, n_per_label=2, seed=0)
    full = counts(ds)
    got = counts(sample)
    for (split, label), available in full.items():
        assert got[(split, label)] == min(2, available)
    row = table.set_index(["split", "label"]).loc[("dev", "disgust")]
    assert (row["available"], row["taken"], bool(row["short"])) == (1, 1, True)
    assert table["taken"].sum() == len(sample)
    assert set(sample["id"]) <= set(ds["id"])
    again, _ = data.stratified_subsample(ds, n_per_label=2, seed=0)
    other, _ = data.stratified_subsample(ds, n_per_label=2, seed=1)
    assert again["id"] == sample["id"]
    assert other["id"] != sample["id"]


# ----------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real() -> dict[str, tuple]:
    """Each real dataset loaded once, with its report and load time in seconds."""
    loaded = {}
    for name in EXTERNAL:
        start = time.perf_counter()
        ds, report = data.load_with_report(name)
        loaded[name] = (ds, report, time.perf_counter() - start)
    return loaded


@realdata
def test_real_available(real):
    assert data.available_datasets() == ["builtin", *EXTERNAL]
    assert all(seconds < 10 for _, _, seconds in real.values())


@realdata
def test_real_isear(real):
    ds, report, _ = real["isear"]
    assert len(ds) == 7666 and report.skips == {}
    assert Counter(ds["label"]) == {
        "anger": 1096,
        "disgust": 1096,
        "fear": 1095,
        "guilt": 1093,
        "joy": 1094,
        "sadness": 1096,
        "shame": 1096,
    }
    assert sum("|" in text for text in ds["text"]) == 163
    assert Counter(ds["split"]) == {"train": 4601, "dev": 1533, "test": 1532}


@realdata
def test_real_meld(real):
    ds, report, _ = real["meld"]
    expected = {
        "anger": (1109, 153, 345),
        "disgust": (271, 22, 68),
        "fear": (268, 40, 50),
        "joy": (1743, 163, 402),
        "neutral": (4710, 470, 1256),
        "sadness": (683, 111, 208),
        "surprise": (1205, 150, 281),
    }
    got = counts(ds)
    assert {label: tuple(got[(s, label)] for s in data.SPLITS) for label in expected} == expected
    assert Counter(ds["split"]) == {"train": 9989, "dev": 1109, "test": 2610}
    assert report.skips == {}


@realdata
def test_real_goemotions_single_label(real):
    ds, report, _ = real["goemotions"]
    expected = {
        "anger": (4293, 555, 572),
        "disgust": (498, 61, 76),
        "fear": (541, 72, 80),
        "joy": (15216, 1941, 1863),
        "neutral": (12823, 1592, 1606),
        "sadness": (2326, 266, 283),
        "surprise": (3858, 459, 488),
    }
    got = counts(ds)
    assert {label: tuple(got[(s, label)] for s in data.SPLITS) for label in expected} == expected
    assert report.read == {"train": 43410, "dev": 5426, "test": 5427}
    assert report.skips == {data.MULTI_LABEL: (43410 - 39555) + (5426 - 4946) + (5427 - 4968)}


@realdata
def test_real_carer(real):
    ds, report, _ = real["carer_emotion"]
    assert Counter(ds["split"]) == {"train": 16000, "dev": 2000, "test": 2000}
    assert report.skips == {data.BLANK_LINE: 1}
    got = counts(ds)
    assert (got[("train", "love")], got[("dev", "love")], got[("test", "love")]) == (1304, 178, 159)
    assert (got[("train", "surprise")], got[("dev", "surprise")], got[("test", "surprise")]) == (572, 81, 66)


@realdata
def test_real_wikitext_articles(real):
    ds, _, _ = real["wikitext-2-raw"]
    # 62 title-shaped lines, of which 2 are formula fragments inside "Constant k filter": 60 articles (as published)
    assert len(ds) == 60
    assert Counter(ds["split"]) == {"train": 42, "dev": 9, "test": 9}
    assert "constant-k-filter" in ds["id"] and "the-hustler-film" in ds["id"]
    assert sum(len(text.split()) for text in ds["text"]) == 241_211


def test_column_reads_a_selection_in_its_order():
    """`column` goes through Arrow; it must honour a selection's index mapping (the raw table does not)."""
    ds = data.load("meld", data_dir=GOOD)
    picked = ds.select([4, 0, 2])
    assert data.column(picked, "id") == [picked[i]["id"] for i in range(3)] == list(picked["id"])
    assert data.column(picked, "id") != picked.data.column("id").to_pylist()[:3]
    assert data.column(data.select_split(ds, "test"), "split") == ["test"] * len(
        data.select_split(ds, "test")
    )


def test_an_empty_load_keeps_the_schema(tmp_path):
    rows = [["", "", "", "", "", ""]]  # a blank record only: nothing to load
    ds, _ = data.load_with_report("crowd_envent", data_dir=write_crowd_envent(tmp_path, rows))
    assert len(ds) == 0 and ds.features == FEATURES
