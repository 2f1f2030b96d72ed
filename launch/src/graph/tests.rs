// SPDX-License-Identifier: MPL-2.0
use super::*;
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
