"""Published prompt sets that presets name as ``data:<set>/<file>`` and ``ddrl data get <set>``
downloads into ``<cache>/data/<set>/`` (``ddrl.data.download``).

Each set is read from one public GitHub repository at a pinned commit (the first source that
answers; a later one holds byte-identical files). Every file carries its git blob id (read from
the commit's tree: the SHA-1 of ``b"blob <size>\\0" + content``, so it also fixes the size) and,
where the file's bytes were read, its sha256 and size. A download is verified against all that
are known. Three files (flow_grpo's ``dataset/ocr/train.txt`` and
``dataset/geneval/train_metadata.jsonl``, DanceGRPO's ``assets/prompts.txt``) were too large
(4 MiB or more) for the copies their checksums were read from: their sha256 and size are
``None`` and they are verified by the git blob id alone (``ddrl data get`` prints the sha256 it
computed, to be pinned here).

Torch-free. Where a reference points (``<cache>/data/<set>/<file>``) is ``ddrl.data.config``'s
(the config layer resolves it without this registry); the names are checked here.
"""

from __future__ import annotations

from pathlib import Path

from ddrl.data.config import PATH_KEYS, DataConfig, cache_root, data_ref
from ddrl.errors import DDRLError

FLOW_GRPO = "yifan123/flow_grpo"
FLOW_GRPO_AT = "ac4c86e8cae021841f1fde853d340e0db67690dd"  # 2025-07-18, what the presets cite
NFT = "NVlabs/DiffusionNFT"
NFT_AT = "24af5554898d85e93efa492f42b5e9cdf4156e9b"  # 2025-09-22
DANCE = "XueZeyue/DanceGRPO"
DANCE_AT = "15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344"  # 2025-10-16

# set name → {"about", "licence", "sources": ((repo, commit), ...), "files": {file name in the
# set: {"path": path in the repository, "blob": git blob id, "sha256", "size"}}}.
# Checksums and sizes read with `git show <commit>:<path> | sha256sum` on the repositories'
# git mirrors; None: the file's bytes were not in the mirror (see the module docstring).
SETS: dict[str, dict] = {
    "flow_grpo-ocr": {
        "about": "flow_grpo's OCR text-rendering prompts (config/grpo.py general_ocr_*); "
        "DiffusionNFT's dataset/ocr is byte-identical",
        "licence": "MIT",
        "sources": ((FLOW_GRPO, FLOW_GRPO_AT), (NFT, NFT_AT)),
        "files": {
            "train.txt": {
                "path": "dataset/ocr/train.txt",
                "blob": "3ce0521b77b0a9031191d66ecc36ebaaf27a3922",
                "sha256": None,
                "size": None,
            },
            "test.txt": {
                "path": "dataset/ocr/test.txt",
                "blob": "8deb4f8d8f2e863f45353354243669b3c991a6a2",
                "sha256": "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc",
                "size": 217565,
            },
        },
    },
    "flow_grpo-pickscore": {
        "about": "flow_grpo's PickScore prompts (config/grpo.py pickscore_*, also its "
        "Qwen-Image configs); DiffusionNFT's dataset/pickscore is byte-identical",
        "licence": "MIT",
        "sources": ((FLOW_GRPO, FLOW_GRPO_AT), (NFT, NFT_AT)),
        "files": {
            "train.txt": {
                "path": "dataset/pickscore/train.txt",
                "blob": "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b",
                "sha256": "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f",
                "size": 2906730,
            },
            "test.txt": {
                "path": "dataset/pickscore/test.txt",
                "blob": "45f05231b969fb5f74c8debd606b22cd3be27f8e",
                "sha256": "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262",
                "size": 239891,
            },
        },
    },
    "flow_grpo-geneval": {
        "about": "flow_grpo's GenEval prompts with their metadata (tag, include, exclude; "
        "config/grpo.py geneval_*); DiffusionNFT's dataset/geneval is byte-identical",
        "licence": "MIT",
        "sources": ((FLOW_GRPO, FLOW_GRPO_AT), (NFT, NFT_AT)),
        "files": {
            "train_metadata.jsonl": {
                "path": "dataset/geneval/train_metadata.jsonl",
                "blob": "0b97e8a6802c08fc7537cd00c76ae79c851bddcb",
                "sha256": None,
                "size": None,
            },
            "test_metadata.jsonl": {
                "path": "dataset/geneval/test_metadata.jsonl",
                "blob": "27cdaf5cc1356fe15aeadbb8df55682ca74228f0",
                "sha256": "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28",
                "size": 340835,
            },
        },
    },
    "flow_grpo-drawbench": {
        "about": "DrawBench prompts as flow_grpo ships them (added in its commit f1f91a2e, "
        "'add drawbench prompt'); DiffusionNFT's dataset/drawbench is byte-identical",
        "licence": "MIT",
        "sources": (
            (FLOW_GRPO, "f1f91a2edbfdc3d03185a931a9b4969929a82da3"),  # 2025-07-21
            (NFT, NFT_AT),
        ),
        "files": {
            "train.txt": {
                "path": "dataset/drawbench/train.txt",
                "blob": "c24820ee4cbadd948f6db5b45fb52d6fc4370894",
                "sha256": "f75b1b05b9902dd77c14d986725424b8bccd93dda2dfddc2f4191d0bc37b276b",
                "size": 111,
            },
            "test.txt": {
                "path": "dataset/drawbench/test.txt",
                "blob": "8d96e7cf7017ce6ce299a6eec96e21467a2ac7aa",
                "sha256": "9006b98feabb94b28a2bc0c88de42fd4f31a9ec3c2a19e308a02c5385b7172f0",
                "size": 65164,
            },
        },
    },
    "flow_grpo-counting_edit": {
        "about": "flow_grpo's Qwen-Image-Edit / FLUX.1-Kontext counting-edit metadata "
        "(config/grpo.py counting_qwenimage_edit*; GenEval-style rows with prompt, t2i_prompt, "
        "image): the source images are not published, dataset/counting_edit/process_data.py "
        "generates them",
        "licence": "MIT",
        "sources": ((FLOW_GRPO, "89943a84977e2293dfda845d8ad7c0c3c8914c64"),),  # 2025-08-04
        "files": {
            "train_metadata.jsonl": {
                "path": "dataset/counting_edit/train_metadata.jsonl",
                "blob": "98b1491b63dd0f299ccfd961c6a8236d35f43fb1",
                "sha256": "64fa1ee657f4292d37bf494326a0f35404dbb217b2a319fb15b4abd715bcb349",
                "size": 214295,
            },
            "test_metadata.jsonl": {
                "path": "dataset/counting_edit/test_metadata.jsonl",
                "blob": "bf5c44d94dbac2b0435f125c48bc8538a98631ee",
                "sha256": "3d38b10151b74e23e06393be908b52e50f816215915c2f904ef4ff7af97fcd50",
                "size": 29503,
            },
        },
    },
    "DanceGRPO-prompts": {
        "about": "DanceGRPO's image prompts from HPDv2 (its FLUX, Qwen-Image and Wan2.1 "
        "scripts: scripts/preprocess/preprocess_qwen_image_rl_embeddings.sh L14)",
        "licence": "see the repository",
        "sources": ((DANCE, DANCE_AT),),
        "files": {
            "prompts.txt": {
                "path": "assets/prompts.txt",
                "blob": "b47234e475645222ca9a0bb7742ebf4d08123855",
                "sha256": None,
                "size": None,
            },
        },
    },
    "DanceGRPO-edit": {
        "about": "DanceGRPO's Qwen-Image-Edit instructions (scripts/preprocess/"
        "preprocess_qwen_image_edit_rl_embeddings.sh L14): rows with source_image, "
        "target_image and an 'instruction' column (no prompt column: not a ddrl prompt file "
        "as is); the images are not in the repository",
        "licence": "see the repository",
        "sources": ((DANCE, DANCE_AT),),
        "files": {
            "edit_data.jsonl": {
                "path": "assets/edit_data.jsonl",
                "blob": "3735aef49265982cd46e07068476fb98e73af44f",
                "sha256": "d49a020487df63db68a40858800e19bacc5469bbb655a7647a4a325df8af95ca",
                "size": 1281286,
            },
        },
    },
}


def set_folder(name: str, cache_dir: str = "") -> Path:
    """Where ``ddrl data get NAME`` puts the set: ``<cache>/data/<NAME>``."""
    return cache_root(cache_dir) / "data" / name


def check_set(name: str) -> dict:
    """The registry entry of ``name`` (a one-line error naming the sets otherwise)."""
    if name not in SETS:
        raise DDRLError(f"unknown data set {name!r}; allowed: {', '.join(SETS)} (ddrl data list)")
    return SETS[name]


def check_refs(cfg: DataConfig) -> None:
    """Every ``data:<set>/<file>`` of ``cfg`` names a set of the registry and one of its files
    (``DataConfig.check`` checks their form only: the config layer does not import this)."""
    for key in PATH_KEYS:
        ref = data_ref(getattr(cfg, key, ""))
        if ref is None:
            continue
        where = f"data.{key}={getattr(cfg, key)!r}"
        if ref[0] not in SETS:
            raise DDRLError(f"{where}: unknown data set {ref[0]!r}; allowed: {', '.join(SETS)}")
        files = SETS[ref[0]]["files"]
        if ref[1] not in files:
            raise DDRLError(
                f"{where}: data set {ref[0]!r} has no file {ref[1]!r}; allowed: {', '.join(files)}"
            )


def require_data(cfg: DataConfig) -> None:
    """What train, synth and eval ask before any work: the references known, every file there
    (a one-line error naming the missing file and the ``ddrl data get`` that fetches it)."""
    check_refs(cfg)
    cfg.require()
