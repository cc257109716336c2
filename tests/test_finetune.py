"""rapidnlp finetune / predict end to end: every method on a tiny local BERT (transformers' own
BertForMaskedLM and BertTokenizer, built here) and on a RapidNLP export; the training loss falls
on a separable toy task; predict's probabilities equal the model's forward computed by hand; user
errors are one line."""
import json
import random

import pytest
import torch

from rapidnlp.cli import main

CHARS = list("很好差棒糟这个东西质量服务酒店房间书本作者快递我们喜欢不满意的了是一在有人和。，！")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DOMAINS = {"hotel": "酒店", "book": "书本", "shop": "快递"}
FILLER = list("这个东西质量服务房间作者我们的了是一在有人和")


def toy_rows(n_per_label: int, seed: int, labelled: bool = True) -> list[dict]:
    """Separable reviews: the text ends in 很好/很棒 (pos) or 很差/很糟 (neg); a domain word first."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_per_label):
        for label in ("neg", "pos"):
            domain = list(DOMAINS)[i % 3]
            word = rng.choice(["好", "棒"] if label == "pos" else ["差", "糟"])
            text = DOMAINS[domain] + "".join(rng.choice(FILLER) for _ in range(rng.randint(3, 8))) + "很" + word + "。"
            rows.append({"text": text, "label": label, "domain": domain} if labelled else {"text": text})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build_bert(out, vocab_tokens=CHARS, seed=0, **tok_kwargs):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    torch.manual_seed(seed)
    vocab = {t: i for i, t in enumerate(SPECIALS + list(vocab_tokens))}
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(out)
    BertTokenizer(vocab=vocab, **tok_kwargs).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {
        "bert": build_bert(root / "bert"),
        "train": write_jsonl(root / "train.jsonl", toy_rows(8, 0)),
        "dev": write_jsonl(root / "dev.jsonl", toy_rows(6, 1)),
        "unlabeled": write_jsonl(root / "unl.jsonl", toy_rows(8, 2, labelled=False)),
        "root": root,
    }


METHOD_ARGS = {
    "cls": [],
    "pet": ["--verbalizer", "neg:差,pos:好", "--template", "{text}很{mask}。"],
    "fuzzy-pet": ["--verbalizer", "neg:差|糟,pos:好|棒", "--template", "{text}很{mask}。"],
    "ptuning": ["--verbalizer", "neg:差,pos:好", "--prompt-tokens", "4"],
    "cptuning": ["--prompt-phrase", "我们喜欢", "--gamma", "16"],
    "efl": ["--descriptions", "neg:很差|pos:很好"],
    "metakd-teacher": [],
}


def finetune(model, train, out, method, *extra, dev=None, epochs=12, lr="2e-3"):
    argv = ["finetune", "--model", model, "--train", train, "--method", method, "--output", str(out),
            "--epochs", str(epochs), "--lr", lr, "--batch-size", "8", *extra]
    code = main(argv + (["--dev", dev] if dev else []))
    assert code == 0
    with open(f"{out}/finetune.json", encoding="utf-8") as f:
        return json.load(f)


def falls(curve):
    """The loss of the last three epochs is below that of the first three."""
    return sum(curve[-3:]) < sum(curve[:3])


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_method_trains_and_its_loss_falls_on_a_tiny_bert(toy, method, tmp_path):
    meta = finetune(toy["bert"], toy["train"], tmp_path / "out", method, *METHOD_ARGS[method])
    assert meta["method"] == method and meta["labels"] == ["neg", "pos"]
    assert falls(meta["metrics"]["loss_curve"]), meta["metrics"]["loss_curve"]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "finetune_head.safetensors").is_file()


def test_selftrain_labels_unlabelled_text_and_trains_a_student(toy, tmp_path, capsys):
    meta = finetune(toy["bert"], toy["train"], tmp_path / "out", "selftrain", "--verbalizer", "neg:差,pos:好",
                    "--template", "{text}很{mask}。", "--unlabeled", toy["unlabeled"], "--threshold", "0.6",
                    "--rounds", "1")
    assert meta["method"] == "pet"
    rounds = meta["metrics"]["rounds"]
    assert len(rounds) == 1 and rounds[0]["pseudo_labelled"] > 0 and rounds[0]["pseudo_labelled"] % 2 == 0
    assert falls(meta["metrics"]["loss_curve"])


@pytest.fixture(scope="module")
def teachers(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    finetune(toy["bert"], toy["train"], root / "pet", "pet", *METHOD_ARGS["pet"])
    finetune(toy["bert"], toy["train"], root / "meta", "metakd-teacher")
    return {"pet": str(root / "pet"), "meta": str(root / "meta")}


@pytest.mark.parametrize("method,teacher", [("kd", "pet"), ("kd", "meta"), ("metakd", "meta")])
def test_distillation_into_a_smaller_student(toy, teachers, method, teacher, tmp_path):
    from rapidnlp.finetune.train import load

    meta = finetune(teachers[teacher], toy["train"], tmp_path / "student", method, "--student-layers", "1",
                    "--student-hidden", "24", "--layer-weight", "1", "--temperature", "4", "--augment", "1",
                    "--unlabeled", toy["unlabeled"])
    assert meta["method"] == "cls" and meta["distilled_from"] == teachers[teacher]
    assert meta["transfer_examples"] == 16 + 16 + 16  # train + unlabelled + one augmented copy of train
    assert falls(meta["metrics"]["loss_curve"])
    student = load(str(tmp_path / "student"))
    assert student.lm.config.num_hidden_layers == 1 and student.lm.config.hidden_size == 24


def _predict(folder, data, out, capsys):
    assert main(["predict", "--model", folder, "--input", data, "--output", str(out), "--batch-size", "5"]) == 0
    err = capsys.readouterr().err
    assert "ms per batch" in err and "in 3 batches of 5" in err
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_predict_cls_equals_the_forward_by_hand(toy, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path / "cls"
    finetune(toy["bert"], toy["train"], out, "cls", epochs=2)
    data = write_jsonl(tmp_path / "in.jsonl", toy_rows(6, 5)[:12] + [{"text": "酒店很好", "text_b": "书本"}])
    rows = _predict(str(out), data, tmp_path / "pred.jsonl", capsys)
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    head = load_file(str(out / "finetune_head.safetensors"))
    examples = [json.loads(line) for line in open(data, encoding="utf-8")]
    for row, ex in zip(rows, examples):
        enc = tok(ex["text"], ex.get("text_b"), return_tensors="pt")
        with torch.no_grad():
            cls = model.bert(**enc).last_hidden_state[0, 0]
        probs = torch.softmax(cls @ head["classifier.weight"].T + head["classifier.bias"], -1)
        assert [row["probs"]["neg"], row["probs"]["pos"]] == pytest.approx(probs.tolist(), abs=1e-5)
        assert row["label"] == ["neg", "pos"][int(probs.argmax())]


def test_predict_fuzzy_pet_with_multi_token_words_equals_the_mlm_forward_by_hand(toy, tmp_path, capsys):
    """Words of 1, 2 and 3 tokens: the template is run once per length with that many [MASK]s; a
    word scores the mean log-probability of its tokens; a label the sum of its words' exp-scores."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path / "fpet"
    words = {"neg": ["差", "不满意"], "pos": ["好", "喜欢"]}
    verbalizer = ",".join(f"{lab}:{'|'.join(ws)}" for lab, ws in words.items())
    finetune(toy["bert"], toy["train"], out, "fuzzy-pet", "--verbalizer", verbalizer, "--template",
             "{text}很{mask}。", epochs=2)
    data = write_jsonl(tmp_path / "in.jsonl", toy_rows(7, 5)[:13])
    rows = _predict(str(out), data, tmp_path / "pred.jsonl", capsys)
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    for row, ex in zip(rows, (json.loads(line) for line in open(data, encoding="utf-8"))):
        mass = {}
        for lab, ws in words.items():
            mass[lab] = 0.0
            for w in ws:
                enc = tok(ex["text"] + "很" + "[MASK]" * len(w) + "。", return_tensors="pt")
                with torch.no_grad():
                    logp = torch.log_softmax(model(**enc).logits[0], -1)
                at = (enc["input_ids"][0] == tok.mask_token_id).nonzero().flatten()
                ids = tok.convert_tokens_to_ids(list(w))
                mass[lab] += torch.exp(sum(logp[a, i] for a, i in zip(at, ids)) / len(w)).item()
        assert row["probs"]["neg"] == pytest.approx(mass["neg"] / (mass["neg"] + mass["pos"]), abs=1e-5)


def test_cptuning_predicts_by_nearest_centroid_and_knn(toy, tmp_path, capsys):
    from rapidnlp.finetune.data import read_examples
    from rapidnlp.finetune.train import load

    out = tmp_path / "cp"
    finetune(toy["bert"], toy["train"], out, "cptuning", *METHOD_ARGS["cptuning"], epochs=4)
    method = load(str(out))
    train = read_examples(toy["train"])
    with torch.no_grad():
        feats = method.features(train)
    labels = torch.tensor([method.labels.index(e.label) for e in train])
    cents = torch.stack([torch.nn.functional.normalize(feats[labels == c].mean(0), dim=0) for c in range(2)])
    assert torch.allclose(method.centroids, cents, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(method.logits(train[:4]), feats[:4] @ cents.T / 0.1, atol=1e-4)
        method.knn = 3  # the k nearest training features vote; a training example is its own nearest
        votes = torch.exp(method.logits(train[:4]))
    near = (feats[:4] @ feats.T).topk(3, dim=1).indices
    want = torch.stack([torch.bincount(labels[n], minlength=2) / 3 for n in near])
    assert torch.allclose(votes, want.clamp(min=1e-6), atol=1e-5)
    rows = _predict(str(out), write_jsonl(tmp_path / "in.jsonl", toy_rows(7, 5)[:13]), tmp_path / "p.jsonl", capsys)
    assert len(rows) == 13 and all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in rows)


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_label_word_merged_by_the_tokenizer_is_one_line(toy, tmp_path, capsys):
    # a WordPiece vocabulary that holds 很好 as one token (Chinese characters not split)
    merging = build_bert(tmp_path / "merging", CHARS + ["很好"], tokenize_chinese_chars=False)
    _one_line_error(capsys, ["finetune", "--model", merging, "--train", toy["train"], "--method", "pet",
                             "--output", str(tmp_path / "o"), "--verbalizer", "neg:差,pos:好",
                             "--template", "{text}很{mask}。"], "merges with the template", "'很[MASK]。'")


def test_data_label_missing_from_the_verbalizer_is_one_line(toy, tmp_path, capsys):
    _one_line_error(capsys, ["finetune", "--model", toy["bert"], "--train", toy["train"], "--method", "pet",
                             "--output", str(tmp_path / "o"), "--verbalizer", "neg:差,good:好"],
                    "train.jsonl:2", "label 'pos'")


def test_unknown_template_text_and_bad_rows_are_one_line(toy, tmp_path, capsys):
    _one_line_error(capsys, ["finetune", "--model", toy["bert"], "--train", toy["train"], "--method", "pet",
                             "--output", str(tmp_path / "o"), "--verbalizer", "neg:差,pos:好",
                             "--template", "{text}总之{mask}"], "[UNK]")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "很好", "label": "pos"}\n{"text": "", "label": "neg"}\n', encoding="utf-8")
    _one_line_error(capsys, ["finetune", "--model", toy["bert"], "--train", str(bad), "--method", "cls",
                             "--output", str(tmp_path / "o")], "bad.jsonl:2", "empty 'text'")
    bad.write_text("text,label\n很好,pos\n很差,\n", encoding="utf-8")
    bad = bad.rename(tmp_path / "bad.csv")
    _one_line_error(capsys, ["finetune", "--model", toy["bert"], "--train", str(bad), "--method", "cls",
                             "--output", str(tmp_path / "o")], "bad.csv:3", "missing 'label'")


def test_unloadable_model_folders_are_one_line(toy, tmp_path, capsys):
    import shutil

    from transformers import BertForMaskedLM

    pickled = tmp_path / "pickled"
    shutil.copytree(toy["bert"], pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(BertForMaskedLM.from_pretrained(toy["bert"]).state_dict(), pickled / "pytorch_model.bin")
    common = ["--train", toy["train"], "--method", "cls", "--output", str(tmp_path / "o")]
    _one_line_error(capsys, ["finetune", "--model", str(pickled), *common], "only pickled weights", "pytorch_model.bin")
    _one_line_error(capsys, ["finetune", "--model", str(tmp_path / "nowhere"), *common], "no such model folder")
    _one_line_error(capsys, ["predict", "--model", toy["bert"], "--input", toy["dev"]], "not a finetuned folder")


# --- a RapidNLP export (pretrained 2 steps at tp=2, converted with `rapidnlp convert --to hf`) ---

from test_convert import exported, trained  # noqa: E402,F401  (module fixtures, reused)

EXPORT_ARGS = {
    "cls": [],
    "pet": ["--verbalizer", "neg:差,pos:好"],
    "fuzzy-pet": ["--verbalizer", "neg:差|糟,pos:好|棒"],
    "ptuning": ["--verbalizer", "neg:差,pos:好"],
    "cptuning": ["--gamma", "16"],
    "efl": ["--descriptions", "neg:很差|pos:很好"],
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_method_on_a_rapidnlp_export(exported, toy, tmp_path, capsys):
    for method, extra in EXPORT_ARGS.items():
        meta = finetune(str(exported), toy["train"], tmp_path / method, method, *extra, epochs=6, lr="1e-3")
        assert meta["method"] == method
        assert falls(meta["metrics"]["loss_curve"]), (method, meta["metrics"]["loss_curve"])
    meta = finetune(str(tmp_path / "pet"), toy["train"], tmp_path / "kd", "kd", "--student-layers", "1",
                    "--student-hidden", "48", "--layer-weight", "1", epochs=6, lr="1e-3")
    assert falls(meta["metrics"]["loss_curve"])
    teacher = tmp_path / "meta"
    finetune(str(exported), toy["train"], teacher, "metakd-teacher", epochs=3)
    meta = finetune(str(teacher), toy["train"], tmp_path / "mkd", "metakd", "--student-layers", "1",
                    "--student-hidden", "48", epochs=6, lr="1e-3")
    assert falls(meta["metrics"]["loss_curve"])
    rows = _predict(str(tmp_path / "pet"), write_jsonl(tmp_path / "in.jsonl", toy_rows(7, 5)[:13]),
                    tmp_path / "p.jsonl", capsys)
    assert len(rows) == 13
