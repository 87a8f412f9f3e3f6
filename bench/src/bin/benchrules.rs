//! Writes a bench rules directory: `benchrules DIR N SINK_URL`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: benchrules DIR N SINK_URL");
        std::process::exit(2);
    }
    let dir = std::path::Path::new(&args[1]);
    let n: usize = args[2].parse().unwrap_or(100);
    let _ = std::fs::create_dir_all(dir.join("templates"));
    let write = |p: std::path::PathBuf, s: String| {
        if let Err(e) = std::fs::write(&p, s) {
            eprintln!("cannot write {}: {e}", p.display());
            std::process::exit(1);
        }
    };
    write(dir.join("bench.yaml"), switchyard_bench::rules(n, &args[3]));
    for (name, text) in switchyard_bench::templates() {
        write(dir.join("templates").join(name), text);
    }
}
