//! Decoding what a server must refuse, and encoding byte for byte.

use super::*;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

fn connect_v4(flags: u8) -> BytesMut {
    // CONNECT, "MQTT", level 4, flags, keep-alive 0, client id "c".
    let mut b = BytesMut::from(
        &[
            0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x00, 0x00, 0x01,
            b'c',
        ][..],
    );
    b.truncate(15);
    b
}

#[test]
fn connect_reserved_flag_and_will_qos_3_are_malformed() {
    let mut ok = connect_v4(0x02);
    assert_eq!(connect_level(&ok, 1024), Ok(Some(4)));
    assert!(decode_connect(&mut ok, Protocol::V311, 1024)
        .unwrap()
        .is_some());
    let mut reserved = connect_v4(0x03);
    assert!(matches!(
        decode_connect(&mut reserved, Protocol::V311, 1024),
        Err(DecodeError::Malformed(_))
    ));
    let mut will_qos3 = connect_v4(0x02 | 0x04 | 0x18);
    assert!(matches!(
        decode_connect(&mut will_qos3, Protocol::V311, 1024),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn truncated_connect_waits_for_more_bytes() {
    let full = connect_v4(0x02);
    for n in 0..full.len() {
        let mut part = BytesMut::from(&full[..n]);
        let level = connect_level(&part, 1024).unwrap();
        if level.is_some() {
            assert!(decode_connect(&mut part, Protocol::V311, 1024)
                .unwrap()
                .is_none());
        }
    }
}

#[test]
fn other_protocol_levels_are_reported() {
    let mut b = connect_v4(0x02);
    b[8] = 3;
    assert_eq!(
        connect_level(&b, 1024),
        Err(DecodeError::UnsupportedProtocol { level: 3 })
    );
    assert!(matches!(
        connect_level(&[0x30, 0x00], 1024),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn oversize_declared_length_is_refused_before_the_body_arrives() {
    let mut b = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    assert!(matches!(
        decode(&mut b, Protocol::V5, 1024 * 1024),
        Err(DecodeError::TooLarge(_))
    ));
    let mut b = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
    assert!(matches!(
        decode(&mut b, Protocol::V5, 1024),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn reserved_fixed_header_flags_are_malformed() {
    for bytes in [
        &[0x36u8, 0x03, 0x00, 0x01, b't'][..], // PUBLISH QoS 3
        &[0x38, 0x03, 0x00, 0x01, b't'],       // QoS 0 with DUP
        &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00], // SUBSCRIBE flags 0
        &[0xC1, 0x00],                         // PINGREQ flags 1
        &[0x00, 0x00],                         // type 0
    ] {
        let mut b = BytesMut::from(bytes);
        assert!(
            matches!(
                decode(&mut b, Protocol::V311, 1024),
                Err(DecodeError::Malformed(_))
            ),
            "{bytes:?}"
        );
    }
}

#[test]
fn empty_v5_disconnect_and_second_connect() {
    let mut b = BytesMut::from(&[0xE0u8, 0x00][..]);
    assert!(matches!(
        decode(&mut b, Protocol::V5, 1024),
        Ok(Some(Inbound::Disconnect { reason: 0, .. }))
    ));
    let mut c = connect_v4(0x02);
    assert!(matches!(
        decode(&mut c, Protocol::V311, 1024),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn packet_id_zero_and_empty_subscribe_are_refused() {
    let mut b = BytesMut::from(&[0x32u8, 0x05, 0x00, 0x01, b't', 0x00, 0x00][..]);
    assert!(decode(&mut b, Protocol::V311, 1024).is_err());
    let mut b = BytesMut::from(&[0x82u8, 0x02, 0x00, 0x01][..]);
    assert!(decode(&mut b, Protocol::V311, 1024).is_err());
    let mut b = BytesMut::from(&[0x82u8, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x04][..]);
    assert!(matches!(
        decode(&mut b, Protocol::V311, 1024),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn v5_subscribe_reserved_option_bits_are_malformed() {
    // SUBSCRIBE pkid 1, no properties, filter "t", options 0x40.
    let mut b = BytesMut::from(&[0x82u8, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x40][..]);
    assert!(matches!(
        decode(&mut b, Protocol::V5, 1024),
        Err(DecodeError::Malformed(_))
    ));
    let mut b = BytesMut::from(&[0x82u8, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x2e][..]);
    assert!(matches!(
        decode(&mut b, Protocol::V5, 1024),
        Ok(Some(Inbound::Subscribe { .. }))
    ));
}

#[test]
fn binary_passwords_are_kept_as_bytes() {
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut c = v4::Connect::new("c");
        c.login = Some(v4::Login::new("u", "pw"));
        let mut b = BytesMut::new();
        match protocol {
            Protocol::V311 => {
                c.write(&mut b).unwrap();
            }
            Protocol::V5 => {
                let c5 = v5::Connect {
                    keep_alive: 0,
                    client_id: "c".into(),
                    clean_start: true,
                    properties: None,
                };
                v5::Packet::Connect(c5, None, Some(v5::Login::new("u", "pw")))
                    .write(&mut b, None)
                    .unwrap();
            }
        }
        // Replace "pw" (the last two bytes) with invalid UTF-8.
        let n = b.len();
        b[n - 2] = 0xff;
        b[n - 1] = 0x00;
        let got = decode_connect(&mut b, protocol, 1024).unwrap().unwrap();
        assert_eq!(got.username.as_deref(), Some("u"));
        assert_eq!(got.password.as_deref(), Some(&[0xff, 0x00][..]));
    }
}

#[test]
fn v5_disconnect_with_reason_is_well_formed() {
    let mut b = BytesMut::new();
    encode(
        &Outbound::Disconnect { reason: 0x8E },
        Protocol::V5,
        &mut b,
        1024,
    )
    .unwrap();
    let p = v5::Packet::read(&mut b, None).unwrap();
    assert!(
        matches!(p, v5::Packet::Disconnect(d) if d.reason_code == v5::DisconnectReasonCode::SessionTakenOver)
    );
    assert!(b.is_empty());
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut seed = 0x1234_5678_u32;
    for _ in 0..200_000 {
        let len = (seed % 120) as usize;
        let mut v = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            v.push(seed as u8);
        }
        // Also a well-framed packet of a valid type around the random body, to reach the
        // codec's inner parsers.
        let firsts = [
            0x10u8, 0x30, 0x32, 0x34, 0x3B, 0x40, 0x50, 0x62, 0x70, 0x82, 0xA2, 0xE0, 0xF0, 0x20,
            0x90,
        ];
        let mut framed = vec![firsts[(seed as usize) % firsts.len()], v.len() as u8];
        framed.extend_from_slice(&v);
        for proto in [Protocol::V311, Protocol::V5] {
            let mut b = BytesMut::from(&framed[..]);
            while let Ok(Some(_)) = decode(&mut b, proto, 1024) {}
            let mut b = BytesMut::from(&framed[..]);
            let _ = decode_connect(&mut b, proto, 1024);
            let mut b = BytesMut::from(&v[..]);
            let _ = connect_level(&b, 1024);
            let _ = decode_connect(&mut b, proto, 1024);
            let mut b = BytesMut::from(&v[..]);
            while let Ok(Some(_)) = decode(&mut b, proto, 1024) {}
        }
    }
}
