# Reference constraints, exportReferencesGraph, structured attributes and the builder's
# system-call filter, built by real Nix 2.8 and by cairn (tests/tests/interop/build_constraints.rs). Attributes named `bad-*` must be refused by
# both, naming the output and the offending paths; every other one must build to the same bytes.
let
  inherit (import ./lib.nix) sh;
  # dep2 refers to dep: dep is a requisite, not a reference, of whatever refers only to dep2.
  dep = sh "echo dep > $out" { name = "dep"; };
  dep2 = sh "echo ${dep} > $out" { name = "dep2"; };
  refs = "echo ${dep} > $out";
  # Structured attributes: busybox sh has no `declare`, so the output path comes from .attrs.json.
  sa = script: attrs: sh "out=$(sed -n 's/.*\"outputs\":{\"out\":\"\\([^\"]*\\)\".*/\\1/p' .attrs.json); ${script}"
    ({ __structuredAttrs = true; } // attrs);
in {
  # Legacy attributes.
  allowed-refs = sh refs { name = "allowed-refs"; allowedReferences = [ dep ]; };
  bad-allowed-refs = sh "echo ${dep} ${dep2} > $out" { name = "bad-allowed-refs"; allowedReferences = [ dep ]; };
  bad-self-not-allowed = sh "echo $out > $out" { name = "bad-self-not-allowed"; allowedReferences = [ ]; };
  self-by-name = sh "echo $out > $out" { name = "self-by-name"; allowedReferences = [ "out" ]; };
  self-not-a-requisite = sh "echo $out > $out" { name = "self-not-a-requisite"; allowedRequisites = [ ]; };
  sibling-by-name = sh "mkdir $out $dev; echo $out > $dev/ref" {
    name = "sibling-by-name"; outputs = [ "out" "dev" ]; allowedReferences = [ "out" ];
  };
  allowed-requisites = sh "echo ${dep2} > $out" { name = "allowed-requisites"; allowedRequisites = [ dep2 dep ]; };
  bad-allowed-requisites = sh "echo ${dep2} > $out" { name = "bad-allowed-requisites"; allowedRequisites = [ dep2 ]; };
  bad-disallowed-refs = sh refs { name = "bad-disallowed-refs"; disallowedReferences = [ dep ]; };
  disallowed-refs-not-transitive = sh "echo ${dep2} > $out" {
    name = "disallowed-refs-not-transitive"; disallowedReferences = [ dep ];
  };
  bad-disallowed-requisites = sh "echo ${dep2} > $out" { name = "bad-disallowed-requisites"; disallowedRequisites = [ dep ]; };
  bad-requisite-through-sibling = sh "mkdir $out $dev; echo $out > $dev/ref; echo ${dep2} > $out/ref" {
    name = "bad-requisite-through-sibling"; outputs = [ "out" "dev" ]; disallowedRequisites = [ dep ];
  };
  bad-specifier = sh refs { name = "bad-specifier"; allowedReferences = [ "nosuchoutput" ]; };

  # exportReferencesGraph, legacy: a validity registration of the closure.
  graph = sh "cat g > $out; echo >> $out; cat d >> $out" {
    name = "graph"; exportReferencesGraph = [ "g" dep2 "d" "${dep}/x" ];
  };
  # A derivation in the graph brings its outputs' closures (Nix's rule, for NixOS images).
  graph-drv = sh "cat g > $out" { name = "graph-drv"; exportReferencesGraph = [ "g" dep2.drvPath ]; };
  bad-graph-odd = sh "touch $out" { name = "bad-graph-odd"; exportReferencesGraph = [ "g" ]; };
  bad-graph-not-input = sh "touch $out" {
    name = "bad-graph-not-input"; exportReferencesGraph = [ "g" (builtins.unsafeDiscardStringContext "${dep}") ];
  };
  # Placeholders in the environment and arguments become the output path.
  placeholders = sh "echo $where ${builtins.placeholder "out"} > $out" {
    name = "placeholders"; where = "${builtins.placeholder "out"}/here";
  };

  # Structured attributes.
  structured = sa "mkdir $out; cp .attrs.json .attrs.sh $out/; env | sort | grep -v '^SHLVL=' > $out/env" {
    name = "structured"; list = [ 1 "two" true null ]; set = { a = "x'y"; b = 2; }; nested = [ [ 1 ] ];
    float = 1.5; big = 4294967297; "not-a-var" = 1; text = "tab\tnl\n\"q\" ${builtins.placeholder "out"}";
    exportReferencesGraph = { closure = [ dep2 ]; };
  };
  structured-checks = sa refs {
    name = "structured-checks"; allowedReferences = [ ];
    outputChecks.out = { allowedReferences = [ dep ]; maxSize = 1000; maxClosureSize = 10000; };
  };
  bad-structured-self-requisite = sa "echo $out > $out" {
    name = "bad-structured-self-requisite"; outputChecks.out.allowedRequisites = [ ];
  };
  bad-structured-disallowed = sa "echo ${dep2} > $out" {
    name = "bad-structured-disallowed"; outputChecks.out.disallowedRequisites = [ dep ];
  };
  bad-max-size = sa refs { name = "bad-max-size"; outputChecks.out.maxSize = 10; };
  bad-max-closure-size = sa refs { name = "bad-max-closure-size"; outputChecks.out.maxClosureSize = 200; };

  # The system-call filter: a setuid or setgid mode is refused to the builder (EPERM), a plain
  # one is not; a builder that goes on after the refusal builds the same bytes in both.
  bad-setuid = sh "echo x > $out; chmod 4755 $out" { name = "bad-setuid"; };
  setgid-refused = sh "mkdir $out; echo x > $out/f; chmod 2755 $out/f || echo refused > $out/why; chmod 755 $out/f" {
    name = "setgid-refused";
  };
}
