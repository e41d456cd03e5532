//! Shell completions and man pages: `cairn completions bash` loads in bash and completes verbs,
//! sub-verbs and options; `cairn man DIR` writes pages that `man -l` renders. Neither needs a
//! daemon, so no store is started (and none must be: the socket below does not exist).

use std::path::Path;
use std::process::{Command, Output};

use cairn_tests::{bin_dir, require_peer};

fn cairn(args: &[&str]) -> Output {
    Command::new(bin_dir().join("cairn"))
        .args(args)
        .env("CAIRN_SOCKET", "/nonexistent/cairn.sock")
        .env("CAIRN_ROOT", "/nonexistent")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = cairn(args);
    assert!(out.status.success(), "cairn {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// What bash's completion function offers for a command line whose last word is being typed.
fn complete(words: &[&str]) -> Vec<String> {
    let script = format!(
        "source <('{}' completions bash) || exit 9\n\
         COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}\n\
         _cairn cairn \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        bin_dir().join("cairn").display(),
        words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
        words.len() - 1
    );
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "bash: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

#[test]
fn bash_completion_loads_and_completes_verbs() {
    if !require_peer("bash") {
        return;
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source <('{}' completions bash); complete -p cairn", bin_dir().join("cairn").display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("-F _cairn cairn"), "{said}{}", String::from_utf8_lossy(&out.stderr));

    assert_eq!(complete(&["cairn", "why"]), ["why-depends"]);
    assert_eq!(complete(&["cairn", "diff-c"]), ["diff-closures"]);
    let verbs = complete(&["cairn", ""]);
    for v in ["add", "path-info", "why-depends", "diff-closures", "du", "realise", "image", "completions", "man"] {
        assert!(verbs.iter().any(|c| c == v), "{v} not offered: {verbs:?}");
    }
    let mut image = complete(&["cairn", "image", "pu"]);
    image.sort();
    assert_eq!(image, ["pull", "push"]);
    let mut opts = complete(&["cairn", "path-info", "--clo"]);
    opts.sort();
    assert_eq!(opts, ["--closure", "--closure-size"]);
    let mut shells: Vec<String> =
        complete(&["cairn", "completions", ""]).into_iter().filter(|c| !c.starts_with('-')).collect();
    shells.sort();
    assert_eq!(shells, ["bash", "elvish", "fish", "powershell", "zsh"]);
}

#[test]
fn zsh_and_fish_scripts_name_the_verbs() {
    let zsh = ok(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef cairn"), "{}", &zsh[..zsh.len().min(200)]);
    assert!(zsh.contains("why-depends"));
    let fish = ok(&["completions", "fish"]);
    assert!(fish.contains("complete -c cairn") && fish.contains("why-depends"));
    // A shell that does not exist is a usage error.
    assert_eq!(cairn(&["completions", "tcsh"]).status.code(), Some(2));
}

#[test]
fn man_pages_render() {
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    ok(&["man", pages.to_str().unwrap()]);
    for page in
        ["cairn.1", "cairn-why-depends.1", "cairn-path-info.1", "cairn-image-pull.1", "cairn-automaton-create.1"]
    {
        assert!(pages.join(page).is_file(), "{page} missing");
    }
    let top = std::fs::read_to_string(pages.join("cairn.1")).unwrap();
    assert!(top.starts_with(".ie"), "roff: {}", &top[..top.len().min(100)]);
    assert!(top.contains("cairn\\-why\\-depends(1)"), "the top page lists the verbs' pages");
    // A directory it cannot create is a one-line error.
    let out = cairn(&["man", "/proc/cairn-man"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("cairn: cannot write man pages into '/proc/cairn-man'"));

    if !require_peer("man") {
        return;
    }
    let render = |page: &Path| {
        let out = Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANWIDTH", "100")
            .env("MAN_KEEP_FORMATTING", "")
            .output()
            .unwrap();
        assert!(out.status.success(), "man -l {}: {}", page.display(), String::from_utf8_lossy(&out.stderr));
        // Justified text: one space between words.
        String::from_utf8(out.stdout).unwrap().split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
    };
    let why = render(&pages.join("cairn-why-depends.1"));
    assert!(why.contains("NAME") && why.contains("cairn-why-depends - Show why PACKAGE has DEPENDENCY"), "{why}");
    assert!(why.contains("--all"), "{why}");
    let top = render(&pages.join("cairn.1"));
    assert!(top.contains("SUBCOMMANDS") && top.contains("cairn-diff-closures(1)"), "{top}");
}
