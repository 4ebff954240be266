//! The allow-list of a private tracker: node ids, one a line; `#` starts a
//! comment, blank lines are skipped. A line that is not a node id makes the
//! whole file an error, so a typo never shuts a node out unnoticed.

use std::collections::HashSet;
use std::path::Path;

use crate::identity::NodeId;

/// Node ids a file names at most (a bound on the memory it takes).
const MAX_NODES: usize = 100_000;

pub fn parse(text: &str) -> Result<HashSet<NodeId>, String> {
    let mut nodes = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let node = NodeId::parse(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        nodes.insert(node);
        if nodes.len() > MAX_NODES {
            return Err(format!("more than {MAX_NODES} node ids"));
        }
    }
    Ok(nodes)
}

pub fn read(path: &Path) -> Result<HashSet<NodeId>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("allow-list {}: cannot read: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("allow-list {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The public key of the all-zero secret key.
    const ZERO: &str = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";

    #[test]
    fn ids_comments_and_blank_lines() {
        let nodes = parse(&format!("# private\n\n  {ZERO}  # the zero key\n")).unwrap();
        assert_eq!(nodes.len(), 1);
        assert!(nodes.contains(&NodeId::parse(ZERO).unwrap()));
        let e = parse(&format!("{ZERO}\nnot-a-node\n")).unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        assert!(parse("").unwrap().is_empty());
    }
}
