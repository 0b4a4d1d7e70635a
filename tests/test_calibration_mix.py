"""Calibration mixes: named sources read from their files, sampled by share, recorded per sample in the cache;
expert statistics per source that add up to the totals; re-weighting them to another mix without a forward
pass; and every bad source refused at parse time, naming its key."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import REPO, TINY, make_tokenizer, tiny_model_of, write_jsonl
from moe_compress.cache import CacheReader, build_cache
from moe_compress.calibration import read_documents, render_documents, sample_mix, tokenize_into_samples
from moe_compress.config import source_windows, validate_config
from moe_compress.errors import ConfigError, DataError
from moe_compress.plan import plan_workflow
from moe_compress.stats import (
    domain_experts,
    expert_frequency,
    expert_frequency_by_source,
    expert_saliency_tables,
    reweighted_statistics,
    with_saliency,
)
from moe_compress.streaming import LayerStream

C4 = str(REPO / "data/c4/c4_en_train.00000-of-01024_first1000.jsonl.gz")
KOWIKI = str(REPO / "data/korean/kowiki_wikiextractor_AA_wiki_00.txt.gz")
MBPP = str(REPO / "data/code/mbpp.jsonl.gz")
GSM8K = str(REPO / "data/math/gsm8k_train.jsonl.gz")
CONSTITUTION = str(REPO / "data/korean/kolaw_constitution.txt.gz")


def mix_config(sources: list[dict], variants: dict | None = None, **calibration) -> dict:
    return {"model": {"path": "demo"},
            "calibration": {"num_samples": 16, "seq_len": 32, **calibration, "sources": sources},
            "perplexity": {"wikitext2_path": str(REPO / "data/wikitext2/wikitext-2-raw-v1_test.joined.txt.gz")},
            "evaluation": {"tasks": []},
            "variants": variants or {"base": {"steps": []}}}


THREE = [{"name": "c4", "path": C4, "share": 0.5},
         {"name": "korean", "path": KOWIKI, "documents": "doc_tags", "share": 0.25, "heldout_docs": 8},
         {"name": "code", "path": MBPP, "text_field": ["text", "code"], "share": 0.25}]


# --- the config -----------------------------------------------------------------------------------------------

def test_a_single_corpus_is_a_one_source_mix_named_c4():
    config = validate_config({"model": {"path": "demo"}, "variants": {"base": {"steps": []}}})
    (source,) = config["calibration"]["sources"]
    assert source["name"] == "c4" and source["path"] == config["calibration"]["path"]
    assert source["share"] == 1.0 and source["heldout_docs"] == config["calibration"]["heldout_docs"]
    assert source_windows(config["calibration"]) == {"c4": config["calibration"]["num_samples"]}


def test_shares_become_window_counts_that_add_up():
    config = validate_config(mix_config(copy.deepcopy(THREE), num_samples=10))
    # 5, 2.5, 2.5: the tie goes to the earlier source
    assert source_windows(config["calibration"]) == {"c4": 5, "korean": 3, "code": 2}
    counted = [{**source, "samples": count} for source, count in zip(THREE, (4, 2, 3))]
    for source in counted:
        del source["share"]
    config = mix_config(counted)
    with pytest.raises(ConfigError, match="'calibration.num_samples': 16, but the sources' samples add up to 9"):
        validate_config(config)
    del config["calibration"]["num_samples"]
    config = validate_config(config)
    assert source_windows(config["calibration"]) == {"c4": 4, "korean": 2, "code": 3}
    assert config["calibration"]["num_samples"] == 9
    # the text field of a chat source defaults to its messages
    chat = validate_config(mix_config([{"name": "chat", "path": C4, "format": "chat"}]))
    assert chat["calibration"]["sources"][0]["text_field"] == "messages"


@pytest.mark.parametrize("change, message", [
    (lambda c: c["calibration"]["sources"][2].update(share=0.2),
     r"config key 'calibration.sources': the shares \(c4 0.5, korean 0.25, code 0.2\) sum to 0.95, not 1"),
    (lambda c: c["calibration"]["sources"][1].update(name="c4"), r"'calibration.sources\[1\].name': 'c4' names two"),
    (lambda c: c["calibration"]["sources"][1].update(hub={"id": "org/ko"}),
     r"'calibration.sources\[1\]': give either path .* not both"),
    (lambda c: c["calibration"].update(path="other.jsonl"), r"'calibration.path': set beside calibration.sources"),
    (lambda c: c["calibration"]["sources"][0].update(samples=4),
     r"'calibration.sources': \['c4', 'korean', 'code'\] give a share and \['c4'\] a count"),
    (lambda c: c["calibration"].update(num_samples=2), r"'calibration.sources\[2\].share': 0.25 of 2 windows .* is none"),
    (lambda c: c["variants"].update(pruned={"method": "reap_prune", "keep": 4, "weights": {"c4": 0.5, "math": 0.5}}),
     r"config key 'variants.pruned.weights.math': not a calibration source \(calibration.sources: c4, korean, code\)"),
    (lambda c: c["variants"].update(pruned={"method": "reap_prune", "keep": 4, "weights": {"c4": 0.5, "code": 0.4}}),
     r"config key 'variants.pruned.weights': the weights sum to 0.9, not 1"),
    (lambda c: c["calibration"]["sources"][0].update(name="C4 web"), r"'calibration.sources\[0\].name'"),
    (lambda c: c["variants"].update(top2={"method": "active_experts", "k": 2, "weights": {"code": 1.0}}),
     r"'variants.top2.weights': no step of this variant reads the expert statistics .* would change nothing"),
])
def test_bad_mixes_are_refused_naming_the_key(change, message):
    config = mix_config(copy.deepcopy(THREE))
    change(config)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_weights_stay_on_the_variant_in_the_short_form():
    config = validate_config(mix_config(copy.deepcopy(THREE), {
        "base": {"steps": []}, "pruned": {"method": "reap_prune", "keep": 4, "weights": {"c4": 0.5, "code": 0.5}}}))
    variant = config["variants"]["pruned"]
    assert variant["weights"] == {"c4": 0.5, "code": 0.5} and "weights" not in variant["steps"][0]


# --- parse-time checks of the sources' files ----------------------------------------------------------------

def plan_of(config: dict, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return plan_workflow(config, environ={})


@pytest.mark.parametrize("bad, message", [
    ("empty", r"'calibration.sources\[2\]': .*empty.jsonl: no non-empty documents in field 'text/code' "
              r"\(calibration.sources\[2\]\)"),
    ("missing_field", r"'calibration.sources\[2\]': .*records.jsonl:1: record has no field 'code' "
                      r"\(calibration.sources\[2\].text_field; the record has \['text', 'url'\]\)"),
    ("too_small", r"'calibration.sources\[2\]': its 3 calibration documents hold \d+ UTF-8 bytes .*fewer than the "
                  r"128 tokens of its windows \(4 x calibration.seq_len\); lower its share"),
    ("few_documents", r"'calibration.sources\[2\].heldout_docs': 100 held-out documents leave none of the 4"),
    ("missing_file", r"config key 'calibration.sources\[2\].path': .*nowhere.jsonl is not a file"),
])
def test_a_bad_source_fails_before_any_job(tmp_path, monkeypatch, bad, message):
    sources = copy.deepcopy(THREE)
    if bad == "empty":
        path = tmp_path / "empty.jsonl"
        path.write_text("".join(json.dumps({"text": text, "code": ""}) + "\n" for text in ("", "  ")))
        sources[2]["path"] = str(path)
    elif bad == "missing_field":
        sources[2]["path"] = str(write_jsonl(tmp_path / "records.jsonl", ["def f(): pass"] * 4))
    elif bad == "too_small":
        path = tmp_path / "small.jsonl"
        path.write_text("".join(json.dumps({"text": "add", "code": "x+y"}) + "\n" for _ in range(4)))
        sources[2].update(path=str(path), heldout_docs=1)
    elif bad == "few_documents":
        path = tmp_path / "four.jsonl"
        path.write_text("".join(json.dumps({"text": "t" * 400, "code": "c" * 400}) + "\n" for _ in range(4)))
        sources[2].update(path=str(path), heldout_docs=100)
    else:
        sources[2]["path"] = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(ConfigError, match=message):
        plan_of(mix_config(sources), tmp_path, monkeypatch)


def test_a_source_too_small_is_counted_with_the_models_tokenizer(tmp_path, monkeypatch):
    """With the model's tokenizer on disk the check counts tokens, not bytes: a source a byte bound lets pass
    but the tokenizer turns into too few tokens is refused."""
    model_dir = tmp_path / "model"
    tiny_model_of("qwen3_moe").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    path = tmp_path / "words.jsonl"
    # words the tokenizer has merged into single tokens: many bytes, few tokens
    path.write_text("".join(json.dumps({"text": "experts " * 6, "code": "experts"}) + "\n" for _ in range(8)))
    sources = copy.deepcopy(THREE)
    sources[2].update(path=str(path), heldout_docs=1)
    config = mix_config(sources)
    config["model"] = {"path": str(model_dir)}
    with pytest.raises(ConfigError, match=r"'calibration.sources\[2\]': its 7 calibration documents hold \d+ tokens "
                                          r"\(\w+\), fewer than the 128 tokens"):
        plan_of(config, tmp_path, monkeypatch)


# --- reading and sampling -------------------------------------------------------------------------------------

def test_plain_text_documents(tmp_path):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text('<doc id="5" title="A">\nA\n\nfirst article\n</doc>\n<doc id="6" title="B">\nB\nsecond\n</doc>\n')
    assert read_documents(wiki, documents="doc_tags") == ["A\n\nfirst article\n", "B\nsecond\n"]
    assert read_documents(wiki, documents="whole") == [wiki.read_text()]
    crlf = tmp_path / "law.txt.gz"
    with gzip.open(crlf, "wb") as handle:
        handle.write("title\r\n\r\nart. 1\r\nart. 2\r\n  \r\nend\r\n".encode())
    assert read_documents(crlf) == ["title", "art. 1\nart. 2", "end\n"]
    assert read_documents(crlf, documents="lines") == ["title", "art. 1", "art. 2", "end"]
    with pytest.raises(DataError, match="no <doc ...> ... </doc> blocks"):
        read_documents(crlf, documents="doc_tags")
    # the bundled Korean Wikipedia chunk: its 131 articles
    articles = read_documents(KOWIKI, documents="doc_tags")
    assert len(articles) == 131 and articles[0].startswith("지미 카터\n")


def test_several_fields_are_joined_and_chat_is_rendered_with_the_template(tmp_path):
    docs = read_documents(GSM8K, ["question", "answer"])
    assert len(docs) == 7473 and docs[0].startswith("Natalia sold clips") and "\n#### 72" in docs[0]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    messages = read_documents(chat, "messages", chat=True, key="calibration.sources[1]")
    tokenizer = make_tokenizer()
    with pytest.raises(DataError, match=r"calibration.sources\[1\].format: chat, but the tokenizer .* no chat template"):
        render_documents(tokenizer, messages, "calibration.sources[1]")
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    assert render_documents(tokenizer, messages, "calibration.sources[1]") == ["<user>hi\n<assistant>hello\n"]
    with pytest.raises(DataError, match=r"field 'text' is not a list of \{role, content\} messages"):
        read_documents(write_jsonl(tmp_path / "plain.jsonl", ["just text"]), "text", chat=True)


def test_sampling_a_mix():
    tokenizer = make_tokenizer()
    pools = {"c4": read_documents(C4)[:-100], "korean": read_documents(KOWIKI, documents="doc_tags")[:-8],
             "code": read_documents(MBPP, ["text", "code"])[:-50]}
    windows = {"c4": 4, "korean": 2, "code": 2}
    keys = {name: f"calibration.sources[{index}]" for index, name in enumerate(pools)}
    ids, sources = sample_mix(tokenizer, pools, windows, 32, 0, dict.fromkeys(pools, "a file"), keys)
    assert ids.shape == (8, 32) and sorted(sources) == sorted(["c4"] * 4 + ["korean"] * 2 + ["code"] * 2)
    again, _ = sample_mix(tokenizer, pools, windows, 32, 0, dict.fromkeys(pools, "a file"), keys)
    assert np.array_equal(ids, again)
    # each source's windows are its own: the same whatever else is in the mix
    alone = tokenize_into_samples(tokenizer, pools["korean"], 2, 32, 0)
    korean = ids[[index for index, name in enumerate(sources) if name == "korean"]]
    assert sorted(map(bytes, korean.astype(np.int64))) == sorted(map(bytes, alone))
    # a one-source mix is the single corpus's windows, in order
    single, names = sample_mix(tokenizer, {"c4": pools["c4"]}, {"c4": 4}, 32, 0, {"c4": "c4"}, {"c4": "calibration"})
    assert np.array_equal(single, tokenize_into_samples(tokenizer, pools["c4"], 4, 32, 0)) and names == ["c4"] * 4
    with pytest.raises(DataError, match=r"calibration.sources\[2\]: a file yields \d+ tokens but its 40000 windows"):
        sample_mix(tokenizer, pools, {**windows, "code": 40000}, 32, 0, dict.fromkeys(pools, "a file"), keys)


# --- statistics per source ------------------------------------------------------------------------------------

def cache_of(model_dir: Path, input_ids: torch.Tensor, sample_sources: list[str], out: Path) -> CacheReader:
    # one sample per batch: every sample runs through the same kernels on the same shapes, in any cache
    meta = {"samples": len(input_ids), "seq_len": input_ids.shape[1], "sample_sources": sample_sources}
    build_cache(LayerStream(model_dir), input_ids, 1, out, meta)
    return CacheReader(out)


def statistics(model_dir: Path, reader: CacheReader) -> tuple[pd.DataFrame, pd.DataFrame]:
    routing = reader.routing()
    names, token_source = reader.token_sources(len(next(iter(routing.values())).logits))
    totals, by_source_saliency = expert_saliency_tables(LayerStream(model_dir), reader.moe_inputs(), names,
                                                        token_source)
    table = with_saliency(expert_frequency(routing), totals)
    by_source = expert_frequency_by_source(routing, names, token_source).merge(
        by_source_saliency, on=["source", "layer", "expert"], validate="one_to_one")
    return table, by_source


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory):
    """A tiny Qwen2-MoE (shared experts beside the routed ones), a cache of 6 samples from three sources in
    an interleaved order, and the same model's cache of the first source's samples alone."""
    work = tmp_path_factory.mktemp("mix")
    model_dir = work / "model"
    tiny_model_of("qwen2_moe").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    input_ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    sample_sources = ["web", "code", "web", "ko", "code", "web"]
    mixed = cache_of(model_dir, input_ids, sample_sources, work / "mixed")
    web = [index for index, name in enumerate(sample_sources) if name == "web"]
    alone = cache_of(model_dir, input_ids[web], ["web"] * len(web), work / "web")
    return model_dir, mixed, alone, input_ids, sample_sources


def test_per_source_counts_add_up_to_the_totals_exactly(mixed_cache):
    model_dir, mixed, _alone, input_ids, sample_sources = mixed_cache
    table, by_source = statistics(model_dir, mixed)
    assert list(dict.fromkeys(by_source["source"])) == ["web", "code", "ko"]
    counts = [column for column in table.columns if column.startswith("selected_rank_")] + ["selected", "tokens"]
    summed = by_source.groupby(["layer", "expert"])[counts].sum().reset_index()
    merged = table.merge(summed, on=["layer", "expert"], suffixes=("", "_summed"))
    for column in counts:
        assert (merged[column] == merged[f"{column}_summed"]).all(), column
    # an independent reference: per source, how often each expert is among each token's top-k, counted from the
    # router cache's rows and the sample each token belongs to
    rows = pd.read_parquet(mixed.directory / "router_logits.parquet", columns=["layer", "token", "topk_indices"])
    rows["source"] = [sample_sources[token // input_ids.shape[1]] for token in rows["token"]]
    top_k = len(rows["topk_indices"].iloc[0])
    chosen = rows.explode("topk_indices").rename(columns={"topk_indices": "expert"})
    reference = chosen.groupby(["source", "layer", "expert"]).size()
    ours = by_source.set_index(["source", "layer", "expert"])["selected"]
    assert ours[ours > 0].sort_index().astype(int).to_dict() == {
        (source, int(layer), int(expert)): count for (source, layer, expert), count in reference.sort_index().items()}
    # REAP saliency is a mean over routed tokens: the sources' means, weighted by their routed counts, are the total
    weighted = by_source.assign(product=by_source["reap_saliency"] * by_source["selected"]).groupby(
        ["layer", "expert"])[["product", "selected"]].sum()
    total = (weighted["product"] / weighted["selected"].where(weighted["selected"] > 0)).fillna(0.0)
    np.testing.assert_allclose(total.to_numpy(), table.set_index(["layer", "expert"])["reap_saliency"]
                               .reindex(total.index).to_numpy(), rtol=1e-12, atol=0)
    assert top_k == 2


def test_reweighting_to_one_source_is_that_source_calibrated_alone(mixed_cache):
    """weights {web: 1} from the mixed cache give the statistics a cache of the web samples alone gives: no new
    forward pass, the same table (float64 sums of the same float32 values: equal to rounding)."""
    model_dir, mixed, alone, _ids, _sources = mixed_cache
    _table, by_source = statistics(model_dir, mixed)
    web_alone, _ = statistics(model_dir, alone)
    reweighted = reweighted_statistics(by_source, {"web": 1.0}).set_index(["layer", "expert"]).sort_index()
    expected = web_alone.set_index(["layer", "expert"]).sort_index()
    scale = reweighted["tokens"] / expected["tokens"]  # counts on the scale of all cached tokens
    np.testing.assert_allclose(reweighted["selected"] / scale, expected["selected"], rtol=1e-12)
    for column in ("frequency", "mean_weight_when_selected", "mean_router_prob", "reap_saliency",
                   "reap_saliency_applied"):
        np.testing.assert_allclose(reweighted[column], expected[column], rtol=1e-6, atol=1e-12, err_msg=column)
    assert list(reweighted.reset_index().columns) == list(web_alone.columns)


def test_reweighting_to_the_token_shares_gives_the_totals(mixed_cache):
    model_dir, mixed, _alone, _ids, sample_sources = mixed_cache
    table, by_source = statistics(model_dir, mixed)
    shares = {name: sample_sources.count(name) / len(sample_sources) for name in ("web", "code", "ko")}
    reweighted = reweighted_statistics(by_source, shares).set_index(["layer", "expert"]).sort_index()
    expected = table.set_index(["layer", "expert"]).sort_index()
    for column in expected.columns:
        np.testing.assert_allclose(reweighted[column].astype(float), expected[column].astype(float), rtol=1e-9,
                                   atol=1e-12, err_msg=column)
    with pytest.raises(DataError, match=r"the weights name \['math'\], which the statistics have no tokens of"):
        reweighted_statistics(by_source, {"math": 1.0})


def test_domain_experts_names_an_expert_one_source_uses_alone():
    rows = []
    for source, frequencies in {"web": [0.5, 0.5, 0.5, 0.0], "ko": [0.45, 0.5, 0.05, 0.5],
                                "code": [0.5, 0.5, 0.5, 0.1]}.items():
        rows += [{"source": source, "layer": 0, "expert": expert, "top_k": 2, "frequency": value}
                 for expert, value in enumerate(frequencies)]
    table = domain_experts(pd.DataFrame(rows))
    specific = table[table["domain_specific"]]
    assert specific[["source", "layer", "expert"]].values.tolist() == [["ko", 0, 3]]
    assert table.iloc[0]["expert"] == 3 and table.iloc[0]["specificity"] == pytest.approx(0.5 / 0.6)
    # used by every source alike: specificity 1/3
    assert table.set_index("expert").loc[1, "specificity"] == pytest.approx(1 / 3)


def test_the_cache_records_each_samples_source(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model_of("qwen3_moe").save_pretrained(model_dir)
    ids = torch.randint(0, 300, (3, 8), generator=torch.Generator().manual_seed(0))
    reader = cache_of(model_dir, ids, ["a", "b", "a"], tmp_path / "cache")
    names, token_source = reader.token_sources(24)
    assert names == ["a", "b"] and token_source.tolist() == [0] * 8 + [1] * 8 + [0] * 8
    with pytest.raises(DataError, match="3 sample sources of 8 tokens for 3 samples and 25 cached tokens"):
        reader.token_sources(25)


def test_the_tiny_dag_config_is_a_three_source_mix():
    """The shared tiny DAG (tests/test_workflow.py) runs on a three-source mix with a re-weighted variant."""
    config = validate_config(copy.deepcopy(TINY))
    assert [source["name"] for source in config["calibration"]["sources"]] == ["c4", "korean", "code"]
    assert config["variants"]["reap4_code"]["weights"] == {"code": 1.0}
