//! Vectors that real Nix 2.8 produced, for the known-answer tests.
//!
//! Made with `nix-store --generate-binary-cache-key peerix-test-1 sk pk`,
//! `nix-store --add`, `nix-instantiate --eval -E 'builtins.toFile ...'` (a path
//! with a reference), `nix store sign -k sk` and
//! `nix copy --to 'file://...?compression=none'`, whose narinfos and NARs are
//! the files beside this one.

pub const SECRET_KEY: &str = "peerix-test-1:/ymXvvUElFIH+nLffhUXpwL3RCudKLIex8jwxJ9gnkvGKfAjm4jeq64yz7Fg/jgLh8lbIJdUyyUnYJDAeiIbcA==\n";
pub const PUBLIC_KEY: &str = "peerix-test-1:xinwI5uI3quuMs+xYP44C4fJWyCXVMslJ2CQwHoiG3A=";

pub struct SignedPath {
    pub path: &'static str,
    pub nar_hash: &'static str,
    pub nar_size: u64,
    pub references: &'static [&'static str],
    pub sig: &'static str,
}

pub const SIGNED_PATHS: &[SignedPath] = &[
    SignedPath {
        path: "/nix/store/mpa7hir4fp8wkj5dbwhvnmc16fyf0nb0-a.txt",
        nar_hash: "sha256:08vdq91bc6iyvjg6w4rqvd6mk8pahiq995jqcf7xdqh9hm5nskwg",
        nar_size: 168,
        references: &["/nix/store/rz3575y4px47iq0g4088iy09i9vvjps0-b.txt"],
        sig: "peerix-test-1:axlt2cymu1o7esu+fGKc+nCDdmiP4r92voVvJcvLIuzX71W320WDtWLI37gy17jhoqXsIqf53WufSwjccWU2AQ==",
    },
    SignedPath {
        path: "/nix/store/rz3575y4px47iq0g4088iy09i9vvjps0-b.txt",
        nar_hash: "sha256:0j8bmvw5zfbk8lf2f1qrgj08ds1xbqx2n23q02qv5xdf1kd0q8if",
        nar_size: 120,
        references: &[],
        sig: "peerix-test-1:mZrjLXIxu52FI1I7fjr+X6aU/dxwgjfWb2xTcg9Fkk4am84yRmG56Fu9nKZRe6PF27qXci/7qtKP1SrBN1Z8Dg==",
    },
    SignedPath {
        path: "/nix/store/vh7v640apmdjkwaypvwypj2mh73lbr83-dir",
        nar_hash: "sha256:0q8kzcddzznk4p880112asyv73f867gs3ahg8gwm2i5vmzfwzaym",
        nar_size: 1064,
        references: &[],
        sig: "peerix-test-1:LaOvb4JTrAmV24xAlz0YvluuZrlhDH7xKyu1zXILB2uAgoJAFqNP9T2CB05Gx/wjTaarDhwTsFd4kOmunxMhCA==",
    },
];

/// `nix copy --to file://` narinfos, as (file name, text).
pub const NARINFOS: &[(&str, &str)] = &[
    ("a-txt", include_str!("testdata/a-txt.narinfo")),
    ("b-txt", include_str!("testdata/b-txt.narinfo")),
    ("dir", include_str!("testdata/dir.narinfo")),
];

/// NARs from the same export: a directory with a subdirectory, an executable,
/// a symlink and an empty file; and a one-file path.
pub const DIR_NAR: &[u8] = include_bytes!("testdata/dir.nar");
pub const FILE_NAR: &[u8] = include_bytes!("testdata/a-txt.nar");

/// The offset of the first byte of the first non-empty file's contents.
pub fn first_file_byte(nar: &[u8]) -> usize {
    let mut from = 0;
    loop {
        let at = from
            + nar[from..]
                .windows(8)
                .position(|w| w == b"contents")
                .expect("a file in the vector");
        let len_at = at + 8;
        let len = u64::from_le_bytes(nar[len_at..len_at + 8].try_into().unwrap());
        if len > 0 {
            return len_at + 8;
        }
        from = len_at;
    }
}
