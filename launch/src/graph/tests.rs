// SPDX-License-Identifier: MPL-2.0
use super::*;
use crate::config::Config;
use serde_json::json;

#[test]
fn parse_forms() {
    let g = parse(&json!("gain")).unwrap();
    assert_eq!(g.single_pipeline(), Some("gain"));
    let g = parse(&json!(["gain", {"pipeline": "invert"}, "gain"])).unwrap();
    let ids: Vec<_> = g.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["gain", "invert", "gain-2"]);
    assert_eq!(g.stages[1].inputs, ["gain"]);
    assert_eq!(g.stages[0].inputs, [INPUT]);
    assert_eq!(g.single_pipeline(), None);
    let g = parse(&json!({"stages": [
        {"id": "a", "pipeline": "gain"},
        {"id": "b", "pipeline": "invert", "inputs": ["input"]},
    ]}))
    .unwrap();
    assert_eq!(g.outputs(), ["a", "b"]);
    let y = parse_yaml("stages:\n  - id: a\n    pipeline: gain\n  - id: b\n    pipeline: invert\n    inputs: [input]\n").unwrap();
    assert_eq!(y, g);
    // Round trip through serde (templates).
    let back: GraphDef = serde_json::from_value(serde_json::to_value(&g).unwrap()).unwrap();
    assert_eq!(back, g);
}

fn cfg() -> Config {
    crate::init_gstreamer().unwrap();
    let mut c = Config::from_env().unwrap();
    c.pipelines = gstaipipeline::pipeline::SearchPath::dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../gst-plugin-aipipeline/testdata/pipelines"),
    );
    c
}

/// Parses and validates; returns the error message.
fn error(def: Value) -> String {
    match parse(&def) {
        Err(e) => e.to_string(),
        Ok(g) => validate(&g, &cfg())
            .err()
            .unwrap_or_else(|| panic!("{def} is valid"))
            .to_string(),
    }
}

#[test]
fn validation_messages_name_the_stage() {
    let cases = [
        (json!(42), "expected a pipeline name"),
        (json!([]), "no stages"),
        (
            json!({"stages": [{"id": "a"}]}),
            "stage 0 ('a'): a stage needs",
        ),
        (
            json!({"stages": [{"id": "a", "pipeline": "gain", "colour": 1}]}),
            "stage 0 ('a'): unknown key 'colour'",
        ),
        (
            json!({"stages": [{"id": "a", "pipeline": "gain"}, {"id": "a", "pipeline": "invert"}]}),
            "stage 'a' is defined twice",
        ),
        (
            json!({"stages": [{"id": "a", "pipeline": "gain", "inputs": ["nope"]}]}),
            "stage 'a' takes its input from 'nope'",
        ),
        (
            json!({"stages": [
                {"id": "a", "pipeline": "gain", "inputs": ["b"]},
                {"id": "b", "pipeline": "invert", "inputs": ["a"]},
            ]}),
            "cycle: a → b → a",
        ),
        (
            json!(["gain", {"id": "x", "pipeline": "nosuchmodel"}]),
            "stage 'x': unknown pipeline 'nosuchmodel' (known pipelines: noop, torchscript,",
        ),
        (
            json!([{"id": "fx", "element": "nosuchelement"}]),
            "stage 'fx': unknown element 'nosuchelement'",
        ),
        (
            json!([{"id": "src", "element": "videotestsrc"}]),
            "stage 'src': element 'videotestsrc' is not a filter",
        ),
        (
            json!(["gain", {"id": "aud", "element": "audioconvert"}]),
            "stage 'aud' cannot take the output of 'gain'",
        ),
        (
            json!([{"id": "g", "pipeline": "gain", "when": "params.x ==="}]),
            "stage 'g': invalid condition 'params.x ==='",
        ),
        (
            json!([{"id": "g", "pipeline": "gain", "params": {"gain": "loud"}}]),
            "stage 'g': params for pipeline 'gain'",
        ),
        (
            json!([{"id": "g", "pipeline": "gain", "deadline_ms": -3}]),
            "stage 0 ('g'): \"deadline_ms\" must be a positive integer",
        ),
        (
            json!([{"id": "g", "providers": ["gain", {"pipeline": "invert", "device": "tpu"}]}]),
            "stage 'g': unknown device 'tpu'",
        ),
        (
            json!([{"id": "f", "element": "videoflip", "params": {"nosuch": 1}}]),
            "stage 'f': element 'videoflip': has no property 'nosuch'",
        ),
        (
            json!([{"id": "f", "element": "videoflip", "params": {"method": "sideways"}}]),
            "stage 'f': element 'videoflip': 'sideways' is not a valid value for property 'method'",
        ),
        (
            json!([{"id": "input", "pipeline": "gain"}]),
            "stage 'input': \"input\" is reserved",
        ),
    ];
    for (def, want) in cases {
        let got = error(def.clone());
        assert!(got.contains(want), "{def}: got {got:?}, want {want:?}");
    }
    assert!(
        parse_yaml("stages: [")
            .unwrap_err()
            .to_string()
            .contains("not valid YAML"),
        "bad YAML"
    );
}

#[test]
fn valid_graphs_validate() {
    let c = cfg();
    for def in [
        json!("gain"),
        json!(["gain", "invert"]),
        json!([{"id": "flip", "element": "videoflip", "params": {"method": "horizontal-flip"}}, "invert"]),
        json!({"stages": [
            {"id": "a", "pipeline": "gain"},
            {"id": "b", "pipeline": "invert", "inputs": ["input"], "when": "params.b"},
            {"id": "c", "pipeline": "noop", "inputs": ["a", "b"], "deadline_ms": 50},
        ]}),
    ] {
        let g = parse(&def).unwrap();
        validate(&g, &c).unwrap_or_else(|e| panic!("{def}: {e}"));
    }
}

#[test]
fn parse_str_forms() {
    assert_eq!(parse_str("noop").unwrap().single_pipeline(), Some("noop"));
    assert_eq!(parse_str(r#"["gain","invert"]"#).unwrap().stages.len(), 2);
    assert!(
        parse_str("[oops")
            .unwrap_err()
            .to_string()
            .contains("not valid JSON")
    );
}

#[test]
fn definition_files() {
    let dir = std::env::temp_dir().join(format!("rivulet-graph-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = dir.join("g.yaml");
    std::fs::write(
        &yaml,
        "# two looks side by side\nstages:\n  - {id: a, pipeline: gain, params: {gain: 2}}\n  - id: b\n    pipeline: invert\n    inputs: [input]\n    when: params.b == true\n",
    )
    .unwrap();
    let g = parse_file(&yaml).unwrap();
    assert_eq!(g.outputs(), ["a", "b"]);
    assert_eq!(g.stages[1].when.as_deref(), Some("params.b == true"));
    assert_eq!(g.stages[0].params, json!({"gain": 2}));
    let js = dir.join("g.json");
    std::fs::write(&js, r#"["gain", "invert"]"#).unwrap();
    assert_eq!(parse_file(&js).unwrap().stages.len(), 2);
    let err = parse_file(&dir.join("missing.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// README.md's stage-graph example (the first ```json block after "Multi-stage pipelines")
/// parses and validates against the daemon's default search path (`styletransfer` from the
/// build tree's `models/`), with no configuration.
#[test]
fn readme_graph_example_validates() {
    crate::init_gstreamer().unwrap();
    let readme = include_str!("../../../README.md");
    let block = readme
        .split("### Multi-stage pipelines")
        .nth(1)
        .and_then(|s| s.split("```json\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the README's graph example");
    let def = parse_str(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
    let mut c = Config::from_env().unwrap();
    c.pipelines =
        gstaipipeline::pipeline::SearchPath::from_sources(&gstaipipeline::pipeline::Sources {
            rivulet_pipelines: None,
            model_dir: None,
            ..gstaipipeline::pipeline::Sources::from_process()
        });
    validate(&def, &c).unwrap_or_else(|e| panic!("{e}\n{block}"));
    let ids: Vec<&str> = def.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["styled", "plain", "soft"]);
}
