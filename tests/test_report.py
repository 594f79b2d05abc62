"""Tests for alignkit.report: the repetition score, the HTML page and results.json."""

import base64
import json
import math
import re
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pytest

from alignkit.errors import UserError
from alignkit.plots import plot_runs
from alignkit.report import repetition_score, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPTS = ["Do you have any favorite memories?", "Is <b>pineapple</b> on pizza & 'fine'?"]


def make_configs(n_prompts: int = 2) -> list[dict]:
    """Five configurations as the tutorial compares them, with distinct answers."""
    names = ["Base model", "SFT", "DPO", "DPO + NLL", "SFT → DPO + NLL"]
    return [{"name": name, "run_dir": None if i == 0 else f"outputs/run{i}",
             "answers": [f"{name} answers prompt {k}." for k in range(n_prompts)],
             "metrics": {"preference_accuracy": 0.5 + i / 10, "reward_chosen": -0.1 * i,
                         "reward_rejected": -0.3 * i, "sft_loss": 1.5 + i}}
            for i, name in enumerate(names)]


def write_fake_run(run_dir, algo, nll_alpha=0.0, steps=50):
    """A minimal run folder: decaying loss, and rewards for DPO."""
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(
        {"algo": algo, "run_name": run_dir.name, "config": {"nll_alpha": nll_alpha, "lr": 5e-5}}))
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "split": "train", "loss": 2.0 * math.exp(-step / 10) + 0.3}
        if algo == "dpo":
            record.update({"rewards/chosen": -0.01 * step, "rewards/rejected": -0.05 * step,
                           "rewards/margins": 0.04 * step})
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


class PageElements(HTMLParser):
    """Every element of a page as ``(tag, attributes, text directly inside it)``, entities decoded."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict, list[str]]] = []
        self._open: list[list[str]] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        text: list[str] = []
        self.elements.append((tag, dict(attrs), text))
        if tag not in ("img", "meta"):  # void elements hold no text and have no end tag
            self._open.append(text)

    def handle_endtag(self, tag):
        self._open.pop()

    def handle_data(self, data):
        if self._open:
            self._open[-1].append(data)

    def texts(self, tag: str, **attrs) -> list[str]:
        """The text of each ``tag`` element whose attributes include ``attrs`` (``class_`` for class)."""
        wanted = {k.rstrip("_"): v for k, v in attrs.items()}
        return ["".join(text) for name, have, text in self.elements
                if name == tag and all(have.get(k) == v for k, v in wanted.items())]


# ----------------------------------------------------------------------------- repetition


def test_repetition_loop_hand_worked():
    # 9 words -> 7 trigrams: abc bca cab abc bca cab abc; 3 distinct, so 4 repeat: 4/7.
    assert repetition_score("a b c a b c a b c") == pytest.approx(4 / 7)


def test_repetition_no_repeats_and_short_texts():
    assert repetition_score("the quick brown fox jumps over the lazy dog") == 0.0
    assert repetition_score("") == 0.0
    assert repetition_score("two words") == 0.0  # fewer than n = 3 words
    assert repetition_score("exactly three words") == 0.0  # one trigram, nothing earlier


def test_repetition_other_n_case_and_punctuation():
    # unigrams: a a a b -> 4 grams, 2 distinct -> 2/4
    assert repetition_score("a a a b", n=1) == pytest.approx(0.5)
    # "Feel?", "feel" and "FEEL." are one word once case and edge punctuation go: 3 grams, 1 distinct
    assert repetition_score("Feel? feel FEEL.", n=1) == pytest.approx(2 / 3)
    # bigrams of "x y x y": xy yx xy -> 3 grams, 2 distinct -> 1/3
    assert repetition_score("x y x y", n=2) == pytest.approx(1 / 3)


def test_repetition_sees_a_loop_inside_one_chunk():
    # "remis-s-s-s-s-s" is one whitespace chunk but words remis s s s s s: trigrams remis-s-s, then
    # s-s-s three times -> 4 grams, 2 distinct -> 2/4
    assert repetition_score("remis-s-s-s-s-s") == pytest.approx(2 / 4)
    assert repetition_score("I'd be remis" + "-s" * 100) > 0.95


def test_repetition_long_loop_tends_to_one():
    text = "What do they make you feel? " * 40
    words = 6 * 40
    assert repetition_score(text) == pytest.approx((words - 2 - 6) / (words - 2))
    assert repetition_score(text) > 0.95


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_repetition_rejects_bad_n(bad):
    with pytest.raises(ValueError):
        repetition_score("a b c", n=bad)


# ----------------------------------------------------------------------------- report


def test_report_escapes_everything(tmp_path):
    configs = make_configs()
    configs[1]["answers"][0] = "<script>alert('x')</script> & done"
    configs[2]["name"] = "DPO <beta=0.1>"
    page = write_report(tmp_path, PROMPTS, configs, title="Runs <&> more").read_text()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; done" in page
    assert "Is &lt;b&gt;pineapple&lt;/b&gt; on pizza &amp; &#39;fine&#39;?" in page
    assert "DPO &lt;beta=0.1&gt;" in page
    assert "<title>Runs &lt;&amp;&gt; more</title>" in page
    assert page.count("<script>") == 1  # only the page's own tab script


def test_report_keeps_whitespace_and_marks_empty_answers(tmp_path):
    configs = make_configs()
    configs[0]["answers"][0] = "Day 1:\n  walk\n\nDay 2:\tboat"
    configs[1]["answers"][1] = "   "
    page = write_report(tmp_path, PROMPTS, configs).read_text()
    assert "Day 1:\n  walk\n\nDay 2:\tboat" in page
    assert "(empty answer)" in page
    assert "white-space:pre-wrap" in page


def test_report_layout_and_generation_note(tmp_path):
    page = write_report(tmp_path, PROMPTS, make_configs()).read_text()
    headers = re.findall(r'<th scope="col">([^<]+)</th>', page)
    assert headers == ["Configuration", "Held-out preference accuracy", "Mean chosen reward",
                       "Mean rejected reward", "Held-out SFT loss", "Mean answer length (words)",
                       "Repetition score"]
    assert page.count('role="tab"') == 5 * len(PROMPTS)
    assert page.count('role="tabpanel"') == 5 * len(PROMPTS)
    assert "SFT → DPO + NLL" in page and "60.0%" in page
    assert "greedy decoding" in page and "do_sample=False" in page and "max_new_tokens=200" in page
    other = write_report(tmp_path / "b", PROMPTS, make_configs(), generation={"do_sample": True, "top_p": 0.9})
    assert "top_p=0.9" in other.read_text() and "greedy" not in other.read_text()


def test_missing_metrics_show_as_dash_and_null(tmp_path):
    configs = make_configs()
    configs[0]["metrics"] = {"preference_accuracy": None, "reward_chosen": float("nan"),
                             "reward_rejected": float("inf")}
    page = write_report(tmp_path, PROMPTS, configs).read_text()
    first_row = re.search(r'<tr><th scope="row">Base model</th>(.*?)</tr>', page).group(1)
    assert first_row.count("<td>\u2013</td>") == 4  # accuracy, both rewards, sft_loss
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["configs"][0]["metrics"]["reward_chosen"] is None


def test_results_json_holds_the_same_numbers(tmp_path):
    configs = make_configs()
    configs[3]["answers"] = ["a b c a b c a b c", "one two three four"]
    configs[4]["metrics"]["repetition"] = 0.25  # given values win over computed ones
    write_report(tmp_path, PROMPTS, configs)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["prompts"] == PROMPTS
    assert results["generation"] == {"do_sample": False, "max_new_tokens": 200}
    assert [c["name"] for c in results["configs"]] == [c["name"] for c in configs]
    dpo_nll = results["configs"][3]
    assert dpo_nll["answers"] == configs[3]["answers"]
    assert dpo_nll["metrics"]["mean_answer_words"] == pytest.approx((9 + 4) / 2)
    assert dpo_nll["metrics"]["repetition"] == pytest.approx((4 / 7 + 0.0) / 2)
    assert dpo_nll["metrics"]["preference_accuracy"] == pytest.approx(0.8)
    assert dpo_nll["run_dir"] == "outputs/run3"
    assert results["configs"][4]["metrics"]["repetition"] == 0.25
    page = (tmp_path / "index.html").read_text()
    assert f"{(4 / 7) / 2:.3f}" in page and "6.5" in page


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c[0]["answers"].pop(), "one answer string per prompt"),
    (lambda c: c[1].update(name="Base model"), "more than once"),
    (lambda c: c[2].update(name=" "), "no name"),
    (lambda c: c[2].update(answers=None), "one answer string per prompt"),
    (lambda c: c.clear(), "at least one configuration"),
])
def test_bad_configs_are_user_errors(tmp_path, mutate, message):
    configs = make_configs()
    mutate(configs)
    with pytest.raises(UserError, match=message):
        write_report(tmp_path, PROMPTS, configs)
    assert not (tmp_path / "index.html").exists()


def test_missing_figure_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.png"):
        write_report(tmp_path / "out", PROMPTS, make_configs(), figures=[tmp_path / "nope.png"])


def test_plots_written_and_embedded_offline(tmp_path):
    runs = [write_fake_run(tmp_path / "sft", "sft"), write_fake_run(tmp_path / "dpo", "dpo", 0.0),
            write_fake_run(tmp_path / "dpo_nll", "dpo", 1.0)]
    figures = plot_runs(runs, out_dir=tmp_path / "figures")
    names = sorted(p.name for p in figures)
    assert names == ["dpo_nll_comparison.png", "dpo_plus_nll_reward_margins.png",
                     "dpo_plus_nll_training_loss.png", "dpo_reward_margins.png", "dpo_training_loss.png",
                     "sft_training_loss.png"]
    for path in figures:
        data = path.read_bytes()
        assert path.stat().st_size > 0 and data[:8] == PNG_MAGIC
    out = tmp_path / "report"
    captioned = [(figures[0], "My own caption")] + figures[1:]
    page = write_report(out, PROMPTS, make_configs(), figures=captioned).read_text()
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == len(figures)
    assert base64.b64decode(sources[0]) == figures[0].read_bytes()
    assert "My own caption" in page and "NLL term" in page
    # Nothing is fetched from anywhere: no external scripts, styles, fonts or images.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    results = json.loads((out / "results.json").read_text())
    assert results["figures"][0] == {"file": figures[0].name, "caption": "My own caption"}
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "results.json"]  # no temp files


def test_report_overwrites_atomically(tmp_path):
    write_report(tmp_path, PROMPTS, make_configs(), title="first")
    write_report(tmp_path, PROMPTS, make_configs(), title="second")
    assert "second" in (tmp_path / "index.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "results.json"]


EVIL = '<script>alert(1)</script> "quotes" & ampersands'


def test_hostile_text_is_shown_as_text_everywhere(tmp_path):
    figure = tmp_path / "curve.png"
    matplotlib.image.imsave(figure, np.zeros((2, 2, 3)))
    prompts = [f"prompt {EVIL}", PROMPTS[1]]
    configs = make_configs()
    configs[2]["name"] = f"name {EVIL}"
    configs[2]["run_dir"] = f"run {EVIL}"
    configs[2]["answers"][0] = f"answer {EVIL}"
    page = write_report(tmp_path / "out", prompts, configs, figures=[(figure, f"caption {EVIL}")],
                        title=f"title {EVIL}").read_text()

    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&amp; ampersands" in page
    parsed = PageElements(page)
    assert [tag for tag, _, _ in parsed.elements].count("script") == 1  # the page's own tab script
    # Decoded, each value reads back exactly as given, in every place the page shows it.
    assert parsed.texts("title") == parsed.texts("h1") == [f"title {EVIL}"]
    assert parsed.texts("blockquote", class_="prompt-text")[0] == f"prompt {EVIL}"
    assert parsed.texts("div", class_="answer")[2] == f"answer {EVIL}"  # prompt 1, third configuration
    assert parsed.texts("th", scope="row", title=f"run {EVIL}") == [f"name {EVIL}"]
    assert parsed.texts("button", role="tab").count(f"name {EVIL}") == len(prompts)
    assert parsed.texts("p", class_="panel-name").count(f"name {EVIL}") == len(prompts)
    assert parsed.texts("figcaption") == [f"caption {EVIL}"]
    assert [a["alt"] for t, a, _ in parsed.elements if t == "img"] == [f"caption {EVIL}"]
    # results.json keeps the raw text: escaping is the page's business only.
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["prompts"][0] == f"prompt {EVIL}"
    assert results["configs"][2]["name"] == f"name {EVIL}"
    assert results["configs"][2]["answers"][0] == f"answer {EVIL}"
    assert results["figures"] == [{"file": "curve.png", "caption": f"caption {EVIL}"}]


def test_failed_write_leaves_no_report_and_no_temporary_files(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    out = tmp_path / "report"
    with monkeypatch.context() as patch:
        patch.setattr("alignkit.io.os.replace", refuse)
        with pytest.raises(OSError, match="No space left"):
            write_report(out, PROMPTS, make_configs(), title="first")
    assert list(out.iterdir()) == []

    # Over an existing report a failed write keeps the old files whole and adds nothing.
    write_report(out, PROMPTS, make_configs(), title="first")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as patch:
        patch.setattr("alignkit.io.os.replace", refuse)
        with pytest.raises(OSError):
            write_report(out, PROMPTS, make_configs(), title="second")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(before) == ["index.html", "results.json"]


def test_quality_table_shows_intervals_and_marks_real_differences(tmp_path):
    from alignkit.quality import Answer, answer_quality

    base = [Answer("the the the the the the", ended=False)] * 12
    better = [Answer(f"A warm answer number {i}.", ended=True) for i in range(12)]
    configs = make_configs()[:2]
    configs[0]["quality"] = answer_quality(base, None)
    configs[1]["quality"] = answer_quality(better, base)
    page = (write_report(tmp_path, PROMPTS, configs, quality_prompts=12)).read_text()
    rows = re.findall(r"<tr><th scope=\"row\">([^<]*)</th>(.*?)</tr>", page.split('id="quality"')[1])
    cells = {name: re.findall(r"<td>(.*?)</td>", rest) for name, rest in rows}
    assert cells["Base model"][2] == "0% [0%, 0%]"          # ended on its own: never, no mark for the base
    assert cells["SFT"][2] == "100% [100%, 100%] *"         # always, beyond noise against the base
    assert cells["SFT"][1] == "0% [0%, 0%] *"               # looping: 100% -> 0%
    assert "Answers to 12 held-out prompts" in page
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["quality_prompts"] == 12 and saved["configs"][1]["quality"]["ended_share"]["outside_noise"]
    # without quality numbers the page has no such table
    assert 'id="quality"' not in write_report(tmp_path / "plain", PROMPTS, make_configs()).read_text()


def test_a_report_replaces_an_earlier_report_but_never_the_users_own_files(tmp_path):
    first = write_report(tmp_path, PROMPTS, make_configs()).read_text()
    again = write_report(tmp_path, PROMPTS, make_configs(), title="Again")   # an earlier report: rewritten
    assert "<title>Again</title>" in again.read_text() and "<title>Again</title>" not in first
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("<h1>mine</h1>")
    with pytest.raises(UserError, match="holds an index.html or results.json that no earlier report wrote"):
        write_report(mine, PROMPTS, make_configs())
    assert (mine / "index.html").read_text() == "<h1>mine</h1>" and not (mine / "results.json").exists()
    (mine / "index.html").unlink()
    (mine / "results.json").write_text('{"mine": 1}')
    with pytest.raises(UserError, match="no earlier report wrote"):
        write_report(mine, PROMPTS, make_configs())
    assert (mine / "results.json").read_text() == '{"mine": 1}'
