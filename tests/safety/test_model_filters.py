"""Model-backed filters through the real service: a transformers text classifier and diffusers'
StableDiffusionSafetyChecker, both tiny random models built here, loaded from paths in the policy. The
expected decisions come from running the same models in this process (the safety checker: diffusers' own
forward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safety_helpers import HERE, health, images_tensor, prompt_request, wait_serving

from unclip.v1 import safety_pb2

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "quiet",
    "lake",
    "angry",
    "mob",
    "calm",
    "sea",
    "storm",
]
PROMPTS = ["a quiet lake", "angry mob", "calm sea", "a storm"]


def make_text_classifier(folder) -> None:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64, id2label={0: "ok", 1: "toxic"}, label2id={"ok": 0, "toxic": 1},
    )  # fmt: skip
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def toxic_probabilities(folder) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        return [
            float(torch.softmax(model(**tokenizer(p, return_tensors="pt")).logits, -1)[0, 1]) for p in PROMPTS
        ]


def make_safety_checker(folder, images: np.ndarray) -> list[bool]:
    """A tiny checker whose first concept's threshold sits between the images' similarities, so that some
    images are flagged and some not; returns diffusers' own verdict per image (has_nsfw_concepts)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=50, **tiny).to_dict(),
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, **tiny).to_dict(),
        projection_dim=8,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        checker.special_care_embeds_weights.fill_(2.0)  # cosine never exceeds 1: no special care
        checker.concept_embeds_weights.fill_(2.0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = ((images.transpose(0, 2, 3, 1) + 1) * 127.5).round().astype(np.uint8)
    clip_input = processor(images=list(pixels), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        cos = (
            torch.nn.functional.normalize(embeds, dim=-1)
            @ torch.nn.functional.normalize(checker.concept_embeds[:1], dim=-1).T
        )
        ranked = sorted(cos[:, 0].tolist())
        checker.concept_embeds_weights[0] = (ranked[1] + ranked[2]) / 2  # two images above, two below
        _, has_nsfw = checker(clip_input=clip_input, images=images.copy())
    checker.save_pretrained(folder / "safety_checker")
    processor.save_pretrained(folder / "feature_extractor")
    return [bool(x) for x in has_nsfw]


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, size=(4, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory, test_images):
    """Both tiny models, built once: folders, the classifier's probabilities and the checker's verdicts."""
    root = tmp_path_factory.mktemp("models")
    make_text_classifier(root / "toxic")
    probs = toxic_probabilities(root / "toxic")
    expected_nsfw = make_safety_checker(root / "checker", test_images)
    assert sum(expected_nsfw) == 2
    threshold = sorted(probs)[1] / 2 + sorted(probs)[2] / 2  # two prompts above it, two below
    return root, probs, threshold, expected_nsfw


def test_text_classifier_and_sd_safety_checker_in_the_service(models, test_images, start_safety):
    tmp_path, probs, threshold, expected_nsfw = models
    policy = f"""\
    version: models-1
    categories:
      harassment: {{threshold: {threshold}, action: block}}
      sexual: {{action: withhold}}
    filters:
      toxic: {{type: text_classifier, path: '{tmp_path / "toxic"}', labels: {{toxic: harassment}}}}
      checker:
        type: sd_safety_checker
        path: '{tmp_path / "checker" / "safety_checker"}'
        category: sexual
    stages:
      prompt: [toxic]
      final_output: [checker]
    """
    safety = start_safety(policy)

    for i, (prompt, p) in enumerate(zip(PROMPTS, probs, strict=True)):
        reply = safety.stub.CheckPrompt(prompt_request(prompt, request_id=f"t{i}"), timeout=30)
        want = safety_pb2.ACTION_BLOCK if p >= threshold else safety_pb2.ACTION_ALLOW
        assert reply.action == want, (prompt, p, threshold)
    records = {r["request_id"]: r for r in safety.records()}
    for i, p in enumerate(probs):
        [score] = records[f"t{i}"]["filters"][0]["scores"]
        assert score["category"] == "harassment" and score["score"] == pytest.approx(p, abs=1e-5)

    request = safety_pb2.CheckImagesRequest(
        images=images_tensor(test_images), stage=safety_pb2.CHECK_STAGE_FINAL_OUTPUT
    )
    reply = safety.stub.CheckImages(request, timeout=30)
    withheld = [v.action == safety_pb2.ACTION_WITHHOLD for v in reply.verdicts]
    assert withheld == expected_nsfw  # the same images diffusers' own checker flags
    assert reply.action == safety_pb2.ACTION_WITHHOLD
    assert all(
        list(v.categories) == (["sexual"] if w else []) for v, w in zip(reply.verdicts, withheld, strict=True)
    )


def test_health_is_not_serving_until_the_models_are_loaded(models, tmp_path, spawn_process):
    root = models[0]
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "categories:\n  harassment: {action: block}\nfilters:\n"
        f"  toxic: {{type: text_classifier, path: '{root / 'toxic'}', labels: {{toxic: harassment}}}}\n"
        "stages:\n  prompt: [toxic]\n"
    )
    process = spawn_process(
        ["-m", "services.safety", "--host", "127.0.0.1", "--port", "0", "--policy", str(policy),
         "--audit-dir",
         str(tmp_path / "audit")]
    )  # fmt: skip
    assert (
        health(process.addr) == "NOT_SERVING"
    )  # listening, transformers still importing / the model loading
    wait_serving(process)
    assert health(process.addr) == "SERVING"


def test_all_filter_types_together_in_one_policy(models, test_images, start_safety, spawn_process):
    """The built-in filters stacked: every one runs, each decision combines them, the audit shows each."""
    root, probs, threshold, expected_nsfw = models
    vendor = spawn_process([str(HERE / "external_filter.py"), "--port", "0", "--word", "pineapple"])
    quietest = PROMPTS[int(np.argmin(probs))]
    safety = start_safety(
        f"""\
        version: stacked-1
        categories:
          violence: {{action: block}}
          harassment: {{threshold: {threshold}, action: block}}
          sexual: {{action: withhold}}
          gore: {{threshold: 0.9, action: withhold}}
        filters:
          words: {{type: blocklist, terms: {{violence: [behead]}}}}
          toxic: {{type: text_classifier, path: '{root / "toxic"}', labels: {{toxic: harassment}}}}
          concepts: {{type: clip_concepts, concepts: [{{category: gore, embedding: [1, 0, 0, 0]}}]}}
          checker: {{type: sd_safety_checker, path: '{root / "checker" / "safety_checker"}'}}
          vendor: {{type: external, address: '{vendor.addr}'}}
        stages:
          prompt: [words, toxic, vendor]
          final_output: [concepts, checker, vendor]
        """
    )
    reply = safety.stub.CheckPrompt(prompt_request(f"behead the pineapple {quietest}", "p1"), timeout=30)
    assert reply.action == safety_pb2.ACTION_BLOCK
    assert sorted(reply.verdicts[0].categories) == ["fruit", "violence"]
    reply = safety.stub.CheckPrompt(prompt_request(quietest, "p2"), timeout=30)
    assert reply.action == safety_pb2.ACTION_ALLOW

    embeds = np.array([[1, 0.05, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    request = safety_pb2.CheckImagesRequest(
        images=images_tensor(test_images),
        image_embeds=images_tensor(embeds),
        stage=safety_pb2.CHECK_STAGE_FINAL_OUTPUT,
        context=safety_pb2.RequestContext(request_id="i1"),
    )
    reply = safety.stub.CheckImages(request, timeout=30)
    expected = [
        sorted((["gore"] if i == 0 else []) + (["sexual"] if expected_nsfw[i] else [])) for i in range(4)
    ]
    assert [sorted(v.categories) for v in reply.verdicts] == expected
    assert [v.action for v in reply.verdicts] == [
        safety_pb2.ACTION_WITHHOLD if cats else safety_pb2.ACTION_ALLOW for cats in expected
    ]
    records = {r["request_id"]: r for r in safety.records()}
    assert [f["filter"] for f in records["p1"]["filters"]] == ["words", "toxic", "vendor"]
    assert [f["filter"] for f in records["i1"]["filters"]] == ["concepts", "checker", "vendor"]
    assert all("error" not in f for r in records.values() for f in r["filters"])
