//! The committed benchmark runs against the README's "Every benchmark run" table: one row per run that wrote a
//! RESULTS.md, each linking to an existing one, and the row `bench.sh` printed for a run copied as printed
//! (only its host column, the CPU model, is named by hand).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// A table row's cells, without the outer pipes.
fn cells(row: &str) -> Vec<&str> {
    row.trim().trim_start_matches('|').trim_end_matches('|').split(" | ").map(str::trim).collect()
}

/// The run id a table row links to: `| [<id>](loadtest/results/<id>/RESULTS.md) | ...`.
fn run_of(row: &str) -> Option<&str> {
    let id = row.strip_prefix("| [")?.split(']').next()?;
    row.contains(&format!("]({})", results_link(id))).then_some(id)
}

fn results_link(id: &str) -> String {
    format!("loadtest/results/{id}/RESULTS.md")
}

#[test]
fn every_benchmark_run_has_its_row_in_the_readme_as_bench_sh_printed_it() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let rows: BTreeMap<&str, &str> = readme.lines().filter_map(|line| Some((run_of(line)?, line))).collect();
    assert!(rows.len() >= 40, "the README's run table: {} rows", rows.len());
    for id in rows.keys() {
        assert!(root.join(results_link(id)).is_file(), "the README's row {id} links to a RESULTS.md that is not there");
    }
    let mut runs = 0;
    let mut printed = 0;
    for entry in std::fs::read_dir(root.join("loadtest/results")).expect("results folder") {
        let folder = entry.expect("entry").path();
        let Ok(results) = std::fs::read_to_string(folder.join("RESULTS.md")) else { continue };
        let id = folder.file_name().and_then(|n| n.to_str()).expect("run id");
        runs += 1;
        let row = rows.get(id).unwrap_or_else(|| panic!("run {id} has a RESULTS.md and no row in the README"));
        // Runs since bench.sh prints the row: the README's is that row, the host named instead of the CPU model.
        if let Some(line) =
            results.lines().filter_map(|line| run_of(line).filter(|run| *run == id).map(|_| line)).next_back()
        {
            printed += 1;
            let (mut from_bench, in_readme) = (cells(line), cells(row));
            assert_eq!(
                from_bench.len(),
                in_readme.len(),
                "run {id}: the README's row has other columns\n{line}\n{row}"
            );
            from_bench[1] = in_readme[1];
            assert_eq!(from_bench, in_readme, "run {id}: the README's row is not the one bench.sh printed");
        }
    }
    assert_eq!(runs, rows.len(), "one README row per run with a RESULTS.md");
    assert!(printed >= 1, "at least the latest run has the row bench.sh printed");
}
