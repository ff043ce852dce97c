//! Protection plans end to end through the CLI: `plan run` (what is due, hooks, retention,
//! off-site copy, standby), `drill` (a measured, recorded recovery), `plan status` (achieved
//! RPO, MTTR, each warning in a case built for it, the Prometheus textfile), `--shard`, the run
//! lock, and errors in a plan naming the line. Sources are real: raw images, a VHD made by
//! qemu-img, and a page blob in a real Azurite.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use stackvault::azure::{BlobClient, BlobOptions};
use stackvault_tests::{
    have_qemu_img, make_disk, outcome, p, pause_at, qemu_img, skip_for, sv_env, sv_ok, Azurite,
    Disk,
};

const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The variable a plan names for the Azurite account key: the key itself is never in a plan.
const KEY_VAR: &str = "SV_PLAN_TEST_AZURITE_KEY";
const MIB: u64 = 1 << 20;

fn endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}/{ACCOUNT}")
}

fn blob_client(port: u16, container: &str, blob: &str) -> Result<BlobClient> {
    Ok(BlobClient::new(
        &format!("azure://{ACCOUNT}/{container}/{blob}"),
        &BlobOptions {
            endpoint: Some(endpoint(port)),
            account_key: Some(KEY.into()),
            ..Default::default()
        },
    )?)
}

/// A page blob holding a raw disk of `size` bytes.
fn page_blob_disk(port: u16, container: &str, blob: &str, size: u64, seed: u64) -> Result<()> {
    let c = blob_client(port, container, blob)?;
    c.create_container()?;
    c.create_page_blob(size)?;
    let bytes = Disk::filled(size, 60, seed).bytes()?;
    for (i, piece) in bytes.chunks(4 * MIB as usize).enumerate() {
        c.put_pages(i as u64 * 4 * MIB, piece)?;
    }
    Ok(())
}

fn run_cli(args: &[&str]) -> Result<(Option<i32>, String, String)> {
    Ok(outcome(&sv_env(
        args,
        &[(KEY_VAR, KEY), ("AZURE_STORAGE_KEY", KEY)],
    )?))
}

/// Runs the CLI with `--json`, the Azurite key in the environment; the report, or an error.
fn json_ok(args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = run_cli(&all)?;
    ensure!(
        code == Some(0),
        "stackvault {args:?} failed ({code:?}): {err}\n{out}"
    );
    serde_json::from_str(&out).with_context(|| format!("no JSON from {args:?}: {err}"))
}

fn actions(report: &Value) -> Result<Vec<(String, String)>> {
    report["vms"]
        .as_array()
        .context("vms")?
        .iter()
        .map(|v| {
            Ok((
                v["vm"].as_str().context("vm")?.to_string(),
                v["action"].as_str().context("action")?.to_string(),
            ))
        })
        .collect()
}

fn vm_status<'a>(status: &'a Value, vm: &str) -> Result<&'a Value> {
    status["applications"]
        .as_array()
        .context("applications")?
        .iter()
        .flat_map(|a| a["vms"].as_array().into_iter().flatten())
        .find(|v| v["vm"] == vm)
        .with_context(|| format!("no status of {vm}: {status:#}"))
}

fn warning_codes(vm: &Value) -> BTreeSet<String> {
    vm["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["code"].as_str().map(str::to_string))
        .collect()
}

/// Two applications, three VMs, five disks: erp-db01 (raw os with a standby file, VHD data1),
/// erp-app01 (raw os, Azurite page blob data), web01 (raw os). erp's RTO is 1 ms, so any
/// measured MTTR exceeds it; web's RPO is 1 s, so web01 is due again a second later.
fn main_plan(dir: &Path, port: u16) -> String {
    let d = |name: &str| dir.join(name).display().to_string();
    format!(
        r#"# A plan as an operator writes it.
[repository]
location = "{repo}"

[copy]
location = "{offsite}"

[run]
concurrency = 3
stagger = "50ms"

[[application]]
name = "erp"
rpo = "24h"
rto = "1ms"
drill_interval = "30d"
retention = {{ keep_last = 5 }}
hooks = {{ before = "echo before $STACKVAULT_VM >> {log}", after = "echo after $STACKVAULT_VM >> {log}" }}

  [[application.vm]]
  name = "erp-db01"
    [[application.vm.disk]]
    name = "os"
    path = "{db_os}"
    standby = "{standby}"
    [[application.vm.disk]]
    name = "data1"
    path = "{db_data}"

  [[application.vm]]
  name = "erp-app01"
    [[application.vm.disk]]
    name = "os"
    path = "{app_os}"
    [[application.vm.disk]]
    name = "data"
    blob = "azure://{ACCOUNT}/vhds/erp-app01-data.raw"
    endpoint = "{endpoint}"
    account_key_env = "{KEY_VAR}"

[[application]]
name = "web"
rpo = "1s"
rto = "1h"
retention = {{ keep_last = 1 }}

  [[application.vm]]
  name = "web01"
    [[application.vm.disk]]
    name = "os"
    path = "{web_os}"
"#,
        repo = d("repo"),
        offsite = d("offsite"),
        log = d("hooks.log"),
        db_os = d("erp-db01-os.raw"),
        standby = d("standby-erp-db01-os.img"),
        db_data = d("erp-db01-data1.vhd"),
        app_os = d("erp-app01-os.raw"),
        endpoint = endpoint(port),
        web_os = d("web01-os.raw"),
    )
}

#[test]
fn a_plan_runs_what_is_due_drills_and_reports_its_objectives() -> Result<()> {
    if skip_for((!have_qemu_img()).then(|| "qemu-img (apt-get install qemu-utils)".into())) {
        return Ok(());
    }
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    make_disk(&dir.join("erp-db01-os.raw"), 6 * MIB, 1)?;
    make_disk(&dir.join("data1.raw"), 5 * MIB, 2)?;
    qemu_img(&[
        "convert",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed,force_size=on",
        p(&dir.join("data1.raw")),
        p(&dir.join("erp-db01-data1.vhd")),
    ])?;
    make_disk(&dir.join("erp-app01-os.raw"), 4 * MIB, 3)?;
    page_blob_disk(az.port, "vhds", "erp-app01-data.raw", 4 * MIB, 4)?;
    make_disk(&dir.join("web01-os.raw"), 3 * MIB, 5)?;
    sv_ok(&["init", p(&dir.join("repo"))])?;
    sv_ok(&[
        "init",
        "--like",
        p(&dir.join("repo")),
        p(&dir.join("offsite")),
    ])?;
    let plan = dir.join("plans.toml");
    std::fs::write(&plan, main_plan(dir, az.port))?;
    let plan = p(&plan);

    // First run: nothing is backed up yet, so every VM is due.
    let first = json_ok(&["plan", "run", plan])?;
    let mut got = actions(&first)?;
    got.sort();
    ensure!(
        got == [
            ("erp-app01".into(), "backed-up".into()),
            ("erp-db01".into(), "backed-up".into()),
            ("web01".into(), "backed-up".into())
        ],
        "{first:#}"
    );
    ensure!(first["failures"] == 0, "{first:#}");
    let log = std::fs::read_to_string(dir.join("hooks.log"))?;
    for line in [
        "before erp-db01",
        "after erp-db01",
        "before erp-app01",
        "after erp-app01",
    ] {
        ensure!(
            log.lines().any(|l| l == line),
            "hook line {line:?} missing: {log}"
        );
    }
    ensure!(!log.contains("web01"), "web has no hooks: {log}");
    let standby = &first["vms"]
        .as_array()
        .context("vms")?
        .iter()
        .find(|v| v["vm"] == "erp-db01")
        .context("erp-db01")?["standby"];
    ensure!(standby[0]["ok"] == true, "{standby:#}");

    // Complete units: three VM snapshots, five disks, each with its snapshot.
    let listed = json_ok(&["vm-snapshots", p(&dir.join("repo"))])?;
    let units = listed["vm_snapshots"].as_array().context("list")?;
    ensure!(units.len() == 3, "{listed:#}");
    ensure!(units.iter().all(|u| u["complete"] == true), "{listed:#}");
    let disks: usize = units
        .iter()
        .map(|u| u["disks"].as_array().map_or(0, Vec::len))
        .sum();
    ensure!(disks == 5, "{listed:#}");

    // Second run a second later: only web01 (RPO 1 s) is due.
    std::thread::sleep(Duration::from_millis(1100));
    let second = json_ok(&["plan", "run", plan])?;
    let mut got = actions(&second)?;
    got.sort();
    ensure!(
        got == [
            ("erp-app01".into(), "not-due".into()),
            ("erp-db01".into(), "not-due".into()),
            ("web01".into(), "backed-up".into())
        ],
        "{second:#}"
    );
    // web keeps one VM snapshot: the first is forgotten as a unit, record first.
    let web = json_ok(&["vm-snapshots", p(&dir.join("repo")), "--vm", "web01"])?;
    ensure!(
        web["vm_snapshots"].as_array().map_or(0, Vec::len) == 1,
        "{web:#}"
    );
    let removed = second["retention"]
        .as_array()
        .context("retention")?
        .iter()
        .filter(|r| r["repository"] == "primary" && r["vm"] == "web01")
        .map(|r| r["vm_snapshots_removed"].as_array().map_or(0, Vec::len))
        .sum::<usize>();
    ensure!(removed == 1, "{second:#}");

    // The off-site copy holds every VM snapshot as a unit too.
    let offsite = json_ok(&["vm-snapshots", p(&dir.join("offsite"))])?;
    let there: BTreeSet<String> = offsite["vm_snapshots"]
        .as_array()
        .context("offsite")?
        .iter()
        .filter(|u| u["complete"] == true)
        .filter_map(|u| u["vm"].as_str().map(str::to_string))
        .collect();
    ensure!(there.len() == 3, "{offsite:#}");

    // Drills: restore and verify every disk, timed, recorded in the repository.
    let scratch = dir.join("scratch");
    let drill = json_ok(&["drill", plan, "--vm", "erp-db01", "--to", p(&scratch)])?;
    ensure!(drill["outcome"] == "passed", "{drill:#}");
    let recovery_ms = drill["recovery_ms"].as_u64().context("recovery_ms")?;
    ensure!(recovery_ms > 0, "{drill:#}");
    let drill_disks = drill["disks"].as_array().context("disks")?;
    ensure!(drill_disks.len() == 2, "{drill:#}");
    ensure!(
        drill_disks
            .iter()
            .all(|d| d["outcome"] == "passed" && d["verified_bytes"].as_u64() > Some(0)),
        "{drill:#}"
    );
    ensure!(
        std::fs::read_dir(&scratch)?.next().is_none(),
        "the scratch files were not removed"
    );
    let drill_id = drill["drill_id"].as_str().context("drill_id")?;
    ensure!(
        dir.join("repo/drills").join(drill_id).is_file(),
        "no drill record {drill_id} in the repository"
    );
    let web_drill = json_ok(&["drill", plan, "--vm", "web01", "--to", p(&scratch)])?;
    ensure!(web_drill["outcome"] == "passed", "{web_drill:#}");

    // Status, a second after web01's last backup: its RPO (1 s) is exceeded.
    std::thread::sleep(Duration::from_millis(1100));
    let prom = dir.join("plan.prom");
    let status = json_ok(&["plan", "status", plan, "--prometheus", p(&prom)])?;
    let db = vm_status(&status, "erp-db01")?;
    ensure!(
        db["achieved_rpo_ms"].as_u64().is_some() && db["rpo_met"] == true,
        "{db:#}"
    );
    ensure!(db["mttr_ms"].as_u64() == Some(recovery_ms), "{db:#}");
    ensure!(db["rto_met"] == false, "{db:#}");
    ensure!(db["offsite_copy_lag_ms"] == 0, "{db:#}");
    ensure!(db["standby"][0]["lag_ms"] == 0, "{db:#}");
    let codes = warning_codes(db);
    ensure!(
        codes == BTreeSet::from(["mttr-exceeds-rto".to_string()]),
        "erp-db01: {codes:?}"
    );
    let app = vm_status(&status, "erp-app01")?;
    let codes = warning_codes(app);
    ensure!(
        codes == BTreeSet::from(["no-drill-within-interval".to_string()]),
        "erp-app01: {codes:?}"
    );
    let web = vm_status(&status, "web01")?;
    ensure!(
        web["mttr_ms"].as_u64().is_some() && web["rto_met"] == true,
        "{web:#}"
    );
    let codes = warning_codes(web);
    ensure!(codes.contains("rpo-exceeded"), "web01: {codes:?}");
    ensure!(!codes.contains("mttr-exceeds-rto"), "web01: {codes:?}");
    let text = std::fs::read_to_string(&prom)?;
    ensure!(
        text.contains(&format!(
            "stackvault_plan_mttr_seconds{{application=\"erp\",vm=\"erp-db01\"}} {}",
            recovery_ms as f64 / 1000.0
        )),
        "{text}"
    );
    ensure!(
        text.contains(
            "stackvault_plan_warning{application=\"web\",vm=\"web01\",code=\"rpo-exceeded\"} 1"
        ),
        "{text}"
    );
    ensure!(
        !text.contains(KEY) && !status.to_string().contains(KEY),
        "a secret leaked"
    );

    // A repository in the same Azurite account as a source, and no copy: both warnings.
    blob_client(az.port, "backups", "x")?.create_container()?;
    let remote = format!("azure://{ACCOUNT}/backups/plan");
    let (code, _, err) = run_cli(&["-r", &remote, "--endpoint", &endpoint(az.port), "init"])?;
    ensure!(code == Some(0), "init on Azurite: {err}");
    let same = dir.join("same.toml");
    std::fs::write(
        &same,
        format!(
            r#"[repository]
location = "{remote}"
endpoint = "{endpoint}"

[[application]]
name = "erp"
rpo = "24h"
rto = "1h"
  [[application.vm]]
  name = "erp-app01"
    [[application.vm.disk]]
    name = "data"
    blob = "azure://{ACCOUNT}/vhds/erp-app01-data.raw"
    endpoint = "{endpoint}"
    account_key_env = "{KEY_VAR}"
"#,
            endpoint = endpoint(az.port)
        ),
    )?;
    let status = json_ok(&["plan", "status", p(&same)])?;
    let codes = warning_codes(vm_status(&status, "erp-app01")?);
    for code in [
        "same-location-as-source",
        "no-offsite-copy",
        "no-vm-snapshot",
    ] {
        ensure!(codes.contains(code), "{code} did not fire: {codes:?}");
    }
    Ok(())
}

fn small_plan(dir: &Path, vms: &[&str], hooks: &str) -> Result<String> {
    let mut text = format!(
        "[repository]\nlocation = \"{}\"\n\n[[application]]\nname = \"fleet\"\nrpo = \"1h\"\nrto = \"1h\"\n{hooks}\n",
        dir.join("repo").display()
    );
    for (i, vm) in vms.iter().enumerate() {
        let disk = dir.join(format!("{vm}.raw"));
        make_disk(&disk, MIB, 100 + i)?;
        text.push_str(&format!(
            "  [[application.vm]]\n  name = \"{vm}\"\n    [[application.vm.disk]]\n    name = \"os\"\n    path = \"{}\"\n",
            disk.display()
        ));
    }
    Ok(text)
}

#[test]
fn shards_split_the_vms_without_overlap_and_dry_runs_write_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    sv_ok(&["init", p(&dir.join("repo"))])?;
    let names: Vec<String> = (1..=9).map(|i| format!("vm{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let plan = dir.join("fleet.toml");
    std::fs::write(&plan, small_plan(dir, &refs, "")?)?;
    let mut seen = BTreeSet::new();
    let mut sizes = Vec::new();
    for i in 1..=3 {
        let shard = format!("{i}/3");
        let args = ["plan", "run", p(&plan), "--shard", &shard, "--dry-run"];
        let report = json_ok(&args)?;
        let got = actions(&report)?;
        ensure!(
            actions(&json_ok(&args)?)? == got,
            "shard {shard} is not stable"
        );
        ensure!(got.iter().all(|(_, a)| a == "would-back-up"), "{report:#}");
        for (vm, _) in &got {
            ensure!(seen.insert(vm.clone()), "{vm} is in two shards");
        }
        sizes.push(got.len());
    }
    ensure!(
        seen == names.iter().cloned().collect::<BTreeSet<_>>(),
        "shards cover {seen:?}, not every VM"
    );
    ensure!(sizes.iter().filter(|&&n| n > 0).count() >= 2, "{sizes:?}");
    let listed = json_ok(&["vm-snapshots", p(&dir.join("repo"))])?;
    ensure!(
        listed["vm_snapshots"] == serde_json::json!([]),
        "a dry run wrote {listed:#}"
    );
    Ok(())
}

#[test]
fn a_run_in_progress_is_not_started_twice_and_a_kill_leaves_no_vm_snapshot() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    sv_ok(&["init", p(&dir.join("repo"))])?;
    let plan = dir.join("one.toml");
    std::fs::write(&plan, small_plan(dir, &["db01"], "")?)?;
    let paused = pause_at(&["plan", "run", p(&plan)], &[], "backup-segment")?;
    let second = json_ok(&["plan", "run", p(&plan)])?;
    let holder = second["already_running"].as_str().unwrap_or_default();
    ensure!(holder.contains("another run of this plan"), "{second:#}");
    ensure!(second["vms"] == serde_json::json!([]), "{second:#}");
    paused.kill()?;
    let listed = json_ok(&["vm-snapshots", p(&dir.join("repo"))])?;
    ensure!(
        listed["vm_snapshots"] == serde_json::json!([]),
        "{listed:#}"
    );
    // The lock died with the killed run: the next run backs up.
    let third = json_ok(&["plan", "run", p(&plan)])?;
    ensure!(
        actions(&third)? == [("db01".into(), "backed-up".into())],
        "{third:#}"
    );
    Ok(())
}

#[test]
fn a_failing_hook_skips_the_vm_and_runs_on_failure() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    sv_ok(&["init", p(&dir.join("repo"))])?;
    let log = dir.join("failed.log");
    let hooks = format!(
        "hooks = {{ before = \"echo frozen-fs-busy >&2; exit 3\", on_failure = \"echo $STACKVAULT_PHASE $STACKVAULT_VM >> {}\" }}",
        log.display()
    );
    let plan = dir.join("hooks.toml");
    std::fs::write(&plan, small_plan(dir, &["db02"], &hooks)?)?;
    let (code, out, err) = run_cli(&["plan", "run", p(&plan), "--json"])?;
    ensure!(code == Some(1), "{code:?}: {err}");
    let report: Value = serde_json::from_str(&out)?;
    let vm = &report["vms"][0];
    ensure!(vm["action"] == "failed", "{report:#}");
    ensure!(vm["hooks"][0]["exit_code"] == 3, "{report:#}");
    ensure!(
        vm["hooks"][0]["stderr_tail"] == "frozen-fs-busy",
        "{report:#}"
    );
    ensure!(
        std::fs::read_to_string(&log)?.trim() == "on-failure db02",
        "on_failure did not run"
    );
    let listed = json_ok(&["vm-snapshots", p(&dir.join("repo"))])?;
    ensure!(
        listed["vm_snapshots"] == serde_json::json!([]),
        "{listed:#}"
    );
    Ok(())
}

#[test]
fn a_malformed_plan_is_refused_naming_the_line_and_key() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let good = small_plan(dir, &["app01"], "")?;
    let cases = [
        // (text, line, what the message must name)
        (good.replace("rto = ", "rtoo = "), 7, "rtoo"),
        (
            good.replace("rpo = \"1h\"", "rpo = \"hourly\""),
            6,
            "hourly",
        ),
        (good.replace("name = \"os\"", "name = \"o:s\""), 12, "o:s"),
        (
            format!("{good}    [[application.vm.disk]]\n    name = \"os\"\n    path = \"/x\"\n"),
            15,
            "named twice",
        ),
    ];
    for (text, line, what) in cases {
        let plan = dir.join("bad.toml");
        std::fs::write(&plan, &text)?;
        let (code, _, err) = run_cli(&["plan", "status", p(&plan)])?;
        ensure!(code == Some(2), "exit {code:?} for {what}: {err}");
        ensure!(
            err.contains(&format!("line {line}")) && err.contains(what),
            "the message does not name line {line} and {what:?}: {err}\n{text}"
        );
    }
    Ok(())
}

#[test]
fn a_drill_into_a_page_blob_container_is_verified_and_recorded() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    sv_ok(&["init", p(&dir.join("repo"))])?;
    blob_client(az.port, "drills", "x")?.create_container()?;
    let drill = format!(
        "[drill]\nto = \"azure://{ACCOUNT}/drills\"\nendpoint = \"{}\"\naccount_key_env = \"{KEY_VAR}\"\n\n",
        endpoint(az.port)
    );
    let plan = dir.join("blob-drill.toml");
    std::fs::write(&plan, format!("{drill}{}", small_plan(dir, &["db03"], "")?))?;
    json_ok(&["plan", "run", p(&plan)])?;
    let report = json_ok(&["drill", p(&plan), "--vm", "db03"])?;
    ensure!(report["outcome"] == "passed", "{report:#}");
    ensure!(report["target_kind"] == "page-blob", "{report:#}");
    ensure!(report["disks"][0]["verified_bytes"] == MIB, "{report:#}");
    let left = report["left_in_place"][0]
        .as_str()
        .context("left_in_place")?;
    let blob = left.rsplit('/').next().context("blob name")?;
    ensure!(
        blob_client(az.port, "drills", blob)?
            .properties()?
            .is_some(),
        "the restored page blob {left} is not there"
    );
    ensure!(
        !report.to_string().contains(KEY),
        "a secret leaked: {report:#}"
    );
    let status = json_ok(&["plan", "status", p(&plan)])?;
    let vm = vm_status(&status, "db03")?;
    ensure!(
        vm["mttr_ms"] == report["recovery_ms"] && vm["drills"] == 1,
        "{vm:#}"
    );
    Ok(())
}
