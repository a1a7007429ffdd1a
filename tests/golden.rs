//! The golden gates: every model of every golden study (golden/<name>/golden.json)
//! re-measured on the CPU and compared with its insta snapshot (counts, exact), with the
//! golden results (consistency), and the findings recomputed from the golden results.
//!
//! Tiers: the default (`cargo test`: `snapshot.n` images per model); the slow tier
//! (`QR_SLOW=1`: `snapshot.n_slow` images, its own snapshots); the GPU tier is
//! `quant-robust golden check golden/<name> --device cuda --n all` on the GPU machine.
//!
//! Tolerance policy: counts are compared exactly (golden/README.md says why): CPU evaluation
//! is deterministic for a given build on a given CPU class; a count that moves is a code
//! change to review, and `golden update` + `cargo insta review` is the way to accept it.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use quant_robust::data::batch::DeviceData;
use quant_robust::data::{self, CifarData};
use quant_robust::eval::wilson95;
use quant_robust::model::{checkpoint, ResNet20};
use quant_robust::study::findings;
use quant_robust::study::golden::{self, GoldenManifest, Snapshot, SnapshotConfig};
use quant_robust::study::StudyResults;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every golden study committed under golden/.
fn golden_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("golden"))
        .expect("golden/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("golden.json").is_file())
        .collect();
    v.sort();
    v
}

fn slow() -> bool {
    std::env::var("QR_SLOW").is_ok_and(|v| v == "1")
}

/// The golden study's data (it must be present: the embedded sample always is).
fn data_of(g: &GoldenManifest) -> Option<CifarData> {
    let d = if g.data.path == "<embedded>" {
        data::load(&data::DataSource::Embedded).unwrap()
    } else {
        let p = crate::common::shipped_archive()?;
        data::load(&data::DataSource::Path(p)).unwrap()
    };
    assert_eq!(
        d.identity.test_sha256, g.data.test_sha256,
        "{}: the data's test split is not the golden study's",
        g.name
    );
    Some(d)
}

fn load(dir: &Path, g: &GoldenManifest, id: &str) -> ResNet20 {
    let m = g.models.iter().find(|m| m.id == id).unwrap();
    quant_robust::quant::load_checkpoint(&golden::checkpoint_path(dir, m), &Device::Cpu, false)
        .unwrap()
}

fn snapshot_name(g: &GoldenManifest, id: &str) -> String {
    format!("{}__{id}{}", g.name, if slow() { "__slow" } else { "" })
}

/// The committed snapshot's value (insta's file: a header between `---` lines, then the
/// JSON body).
fn committed(name: &str) -> Option<serde_json::Value> {
    let p = root()
        .join("tests/snapshots")
        .join(format!("tests__golden__{name}.snap"));
    let text = std::fs::read_to_string(p).ok()?;
    let body = text.splitn(3, "---\n").nth(2)?;
    serde_json::from_str(body).ok()
}

fn n_of(g: &GoldenManifest) -> usize {
    if slow() {
        g.snapshot.n_slow
    } else {
        g.snapshot.n
    }
}

#[test]
fn golden_studies_exist_and_say_what_made_them() {
    let dirs = golden_dirs();
    assert!(!dirs.is_empty(), "no golden study under golden/");
    for d in dirs {
        let g = golden::read(&d).unwrap();
        assert!(!g.code.git_dirty, "{}: made from a dirty tree", g.name);
        assert!(!g.device_label.is_empty() && !g.command.is_empty());
        let res: StudyResults = quant_robust::io::read_json(&d.join("results.json")).unwrap();
        assert_eq!(res.models.len(), g.models.len());
        for m in &g.models {
            assert!(golden::checkpoint_path(&d, m).is_file(), "{}", m.id);
        }
    }
}

/// One snapshot per golden model (default tier: `snapshot.n` images; `QR_SLOW=1`: more),
/// and the consistency gate: the CPU numbers agree with the golden results within their
/// binomial intervals.
#[test]
fn golden_models_match_their_snapshots_and_the_golden_results() {
    for dir in golden_dirs() {
        let g = golden::read(&dir).unwrap();
        let Some(d) = data_of(&g) else { continue };
        let res: StudyResults = quant_robust::io::read_json(&dir.join("results.json")).unwrap();
        let test = DeviceData::new(&d.test, &Device::Cpu).unwrap();
        let t = std::time::Instant::now();
        for m in &g.models {
            let model = load(&dir, &g, &m.id);
            let s = golden::snapshot(&model, &test, &g.snapshot, n_of(&g)).unwrap();
            // Consistency with the golden results: overlapping Wilson intervals.
            let gm = res.model(&m.spec).unwrap();
            let (lo, hi) = wilson95(s.clean, s.n);
            assert!(
                gm.clean.ci95.0 <= hi && lo <= gm.clean.ci95.1,
                "{}: clean {}/{} here vs golden {}/{}",
                m.id,
                s.clean,
                s.n,
                gm.clean.correct,
                gm.clean.total
            );
            for (eps, k) in &s.fgsm {
                let e: f64 = eps.trim_end_matches("/255").parse::<f64>().unwrap() / 255.0;
                if let Some(ge) = gm.attack_at("fgsm", e) {
                    let (lo, hi) = wilson95(*k, s.n);
                    assert!(
                        ge.ci95.0 <= hi && lo <= ge.ci95.1,
                        "{}: FGSM {eps} {k}/{} vs golden {}/{}",
                        m.id,
                        s.n,
                        ge.correct,
                        ge.total
                    );
                }
            }
            insta::assert_json_snapshot!(snapshot_name(&g, &m.id), s);
        }
        eprintln!(
            "golden {}: {} models × {} images in {:.0}s",
            g.name,
            g.models.len(),
            n_of(&g),
            t.elapsed().as_secs_f64()
        );
    }
}

/// F1-F6 recomputed from the golden results give the verdicts golden records: a change
/// to the findings' code that flips one fails here.
#[test]
fn findings_recomputed_from_golden_results_keep_their_verdicts() {
    for dir in golden_dirs() {
        let res: StudyResults = quant_robust::io::read_json(&dir.join("results.json")).unwrap();
        let again = findings::all(&res);
        assert_eq!(again.len(), 6);
        for (a, b) in again.iter().zip(&res.findings) {
            assert_eq!(a.id, b.id);
            assert_eq!(
                a.status,
                b.status,
                "{} {}: golden says {}, the code now says {}",
                dir.display(),
                a.id,
                b.status,
                a.status
            );
            assert_eq!(a.margin, b.margin, "{}: margin moved", a.id);
        }
    }
}

/// The project's answer, from the fully trained models of the `cpu` study frozen in
/// golden/study-cpu: each finding's verdict, recomputed by today's code from the golden
/// results, with a margin and 95% interval that say the same (above zero for "holds", below
/// for "does not hold" where the verdict is one comparison's sign). A change to the findings'
/// code, the thresholds or the golden results that moves an answer fails here by name.
#[test]
fn study_cpu_answers_f1_to_f6() {
    use quant_robust::study::verdict::Status::{DoesNotHold, Holds};
    let dir = root().join("golden/study-cpu");
    let res: StudyResults = quant_robust::io::read_json(&dir.join("results.json")).unwrap();
    assert!(
        res.unfinished.is_empty(),
        "golden/study-cpu is not a finished study"
    );
    let answer = [
        ("F1", DoesNotHold),
        ("F2", Holds),
        ("F3", Holds),
        ("F4", Holds),
        ("F5", Holds),
        ("F6", Holds),
    ];
    let now = findings::all(&res);
    for (id, status) in answer {
        let v = now.iter().find(|v| v.id == id).unwrap();
        assert_eq!(v.status, status, "{id}: {} ({})", v.note, v.measure);
        let (Some(m), Some((lo, hi))) = (v.margin, v.margin_ci95) else {
            assert_eq!(id, "F5", "{id} has no margin");
            continue;
        };
        assert!(lo <= m && m <= hi, "{id}: margin {m} outside ({lo}, {hi})");
        match (id, status) {
            ("F1" | "F2" | "F3" | "F4", Holds) => assert!(lo > 0.0, "{id}: ({lo}, {hi})"),
            ("F1" | "F2" | "F4", DoesNotHold) => assert!(hi < 0.0, "{id}: ({lo}, {hi})"),
            _ => {}
        }
    }
}

/// The snapshots catch meaningful moves: a perturbed weight or another ε gives counts that
/// differ from the committed snapshot, while the unperturbed model gives it exactly.
#[test]
fn snapshot_tests_fail_when_a_weight_or_eps_moves() {
    let dir = golden_dirs().into_iter().next().expect("a golden study");
    let g = golden::read(&dir).unwrap();
    let Some(d) = data_of(&g) else { return };
    let test = DeviceData::new(&d.test, &Device::Cpu).unwrap();
    let id = g
        .models
        .iter()
        .find(|m| !m.spec.is_quantized())
        .unwrap()
        .id
        .clone();
    let name = snapshot_name(&g, &id);
    let Some(pinned) = committed(&name) else {
        panic!("no committed snapshot {name}: run `cargo insta test --review`")
    };
    let value = |s: &Snapshot| serde_json::to_value(s).unwrap();
    let model = load(&dir, &g, &id);
    let n = n_of(&g);
    let s = golden::snapshot(&model, &test, &g.snapshot, n).unwrap();
    assert_eq!(value(&s), pinned, "the unperturbed model must match");

    // A weight perturbed: conv1's filters scaled by 0.5.
    let mut state: std::collections::BTreeMap<String, Tensor> = model.tensors().clone();
    let w = state["conv1.weight"].clone();
    state.insert("conv1.weight".into(), (w * 0.5).unwrap());
    let moved = ResNet20::from_tensors(state, model.num_batches_tracked(), &Device::Cpu, false)
        .unwrap()
        .with_seam(model.seam().clone());
    let s = golden::snapshot(&moved, &test, &g.snapshot, n).unwrap();
    assert_ne!(value(&s), pinned, "a perturbed conv1 went unnoticed");

    // Another ε: the labels change, and so do the counts themselves.
    let counts = |v: &serde_json::Value| -> Vec<u64> {
        ["fgsm", "pgd"]
            .iter()
            .flat_map(|a| {
                v[a].as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p[1].as_u64().unwrap())
            })
            .collect()
    };
    let mut cfg = g.snapshot.clone();
    cfg.eps = cfg.eps.iter().map(|e| e / 2.0).collect();
    let s = golden::snapshot(&model, &test, &cfg, n).unwrap();
    assert_ne!(value(&s), pinned, "another ε went unnoticed");
    assert_ne!(
        counts(&value(&s)),
        counts(&pinned),
        "halving ε left every count unchanged"
    );
}

#[test]
fn golden_update_refuses_without_provenance() {
    let dir = crate::common::tempdir();
    let refused = |study: &Path, name: &str, label: &str, cmd: &str, snap: SnapshotConfig| {
        golden::update(study, dir.path(), name, label, cmd, snap, &root())
            .unwrap_err()
            .to_string()
    };
    let d = SnapshotConfig::default;
    let e = refused(dir.path(), "x", " ", "cmd", d());
    assert!(e.contains("device-label"), "{e}");
    let e = refused(dir.path(), "x", "cpu", "", d());
    assert!(e.contains("command"), "{e}");
    let e = refused(dir.path(), "../x", "cpu", "cmd", d());
    assert!(e.contains("name"), "{e}");
    let none = SnapshotConfig { n: 0, ..d() };
    let e = refused(dir.path(), "x", "cpu", "cmd", none);
    assert!(
        e.contains("snapshot images") && e.contains("0 / 256"),
        "{e}"
    );
    // Results made by code from a dirty tree are refused (or, in a dirty checkout, the tree
    // or the binary is refused first).
    let study = dir.path().join("study");
    let mut res: StudyResults =
        quant_robust::io::read_json(&golden_dirs()[0].join("results.json")).unwrap();
    res.manifest.code.git_dirty = true;
    quant_robust::io::write_json_atomic(&study.join("results.json"), &res).unwrap();
    let e = refused(&study, "x", "cpu", "cmd", d());
    assert!(e.contains("dirty") || e.contains("uncommitted"), "{e}");
    assert!(!dir.path().join("x").exists(), "nothing written on refusal");
}

/// The slow tier (`QR_SLOW=1`), on the golden robust checkpoint once it is committed:
/// AutoAttack ≤ APGD-CE ≤ PGD-10 on the same 1,000 seeded test images at 8/255 (about 40
/// minutes on 2 cores). The numbers are printed for the record.
#[test]
fn autoattack_is_below_apgd_and_pgd_on_the_golden_robust_checkpoint() {
    use quant_robust::attack::{self, Attack, AttackSettings, Norm};
    use quant_robust::eval::robust::{evaluate, RobustnessConfig};
    let ck = root().join("golden/checkpoints/robust.safetensors");
    if !slow() {
        return;
    }
    assert!(ck.is_file(), "the slow tier needs {}", ck.display());
    let data = data::load(&data::DataSource::Path(
        crate::common::shipped_archive().expect("the shipped archive"),
    ))
    .unwrap();
    let dd = DeviceData::new(&data.test, &Device::Cpu).unwrap();
    let model = quant_robust::quant::load_checkpoint(&ck, &Device::Cpu, false).unwrap();
    let idx = quant_robust::eval::eval_indices(&dd, Some(1000), 0).unwrap();
    let s = AttackSettings::default();
    let attacks: Vec<Box<dyn Attack>> = ["pgd", "apgd-ce", "autoattack"]
        .iter()
        .map(|a| attack::build(a, &s, Norm::Linf).unwrap())
        .collect();
    let cfg = RobustnessConfig {
        eps: vec![8.0 / 255.0],
        ..RobustnessConfig::default()
    };
    let r = evaluate(&model, &dd, &idx, &attacks, &cfg, &mut |_, _, _, _| {}).unwrap();
    for a in &r.attacks {
        eprintln!(
            "{}: {}/{} ({:.1} s)",
            a.attack, a.per_eps[0].correct, a.per_eps[0].total, a.wall_s
        );
    }
    let c: Vec<usize> = r.attacks.iter().map(|a| a.per_eps[0].correct).collect();
    assert!(
        c[2] <= c[1] && c[1] <= c[0],
        "AutoAttack {} APGD-CE {} PGD-10 {}",
        c[2],
        c[1],
        c[0]
    );
}

/// The committed golden FP checkpoints (golden/checkpoints/) are what their manifests say:
/// the file hashes to the sha256 the `cpu` preset pins (and to its `.sha256`), and it classifies exactly the recorded number of the
/// 10,000 test images (a count, so any change to the weights, the data decoding or the
/// forward pass that moves one image fails here).
#[test]
fn golden_fp_checkpoints_keep_their_hash_and_test_count() {
    use sha2::{Digest, Sha256};
    let Some(archive) = crate::common::shipped_archive() else {
        eprintln!("skipped: the shipped archive is not beside the checkout");
        return;
    };
    let data = data::load(&data::DataSource::Path(archive)).unwrap();
    let dd = DeviceData::new(&data.test, &Device::Cpu).unwrap();
    let idx: Vec<u32> = (0..dd.len() as u32).collect();
    for (name, pinned) in quant_robust::study::config::GOLDEN_CHECKPOINTS {
        let ck = root().join(format!("golden/checkpoints/{name}.safetensors"));
        let hash = format!("{:x}", Sha256::digest(std::fs::read(&ck).unwrap()));
        assert_eq!(
            hash, pinned,
            "{name}: the file's sha256 is not the cpu preset's"
        );
        let beside = std::fs::read_to_string(ck.with_extension("sha256")).unwrap();
        assert!(
            beside.starts_with(&hash),
            "{name}: sha256 {hash}, {name}.sha256 says {beside}"
        );
        let manifest = checkpoint::load_manifest(&ck).unwrap().unwrap();
        let recorded = manifest.metrics["test_accuracy"] * manifest.metrics["test_images"];
        let model = quant_robust::quant::load_checkpoint(&ck, &Device::Cpu, false).unwrap();
        let acc = quant_robust::eval::clean_accuracy(&model, &dd, &idx, 500).unwrap();
        assert_eq!(acc.total, 10_000);
        assert_eq!(
            acc.correct as f64,
            recorded.round(),
            "{name}: test count moved"
        );
    }
}
