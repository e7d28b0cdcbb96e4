# 20 rules that the load's messages never match: the cost of evaluating them.
require ["fileinto", "imap4flags", "envelope", "variables"];
if header :contains "X-Spam-Flag0" "YES" { fileinto "Junk0"; stop; }
if address :domain :is "from" "list0.example" { addflag "\\Seen"; fileinto "L0"; }
if header :contains "X-Spam-Flag1" "YES" { fileinto "Junk1"; stop; }
if address :domain :is "from" "list1.example" { addflag "\\Seen"; fileinto "L1"; }
if header :contains "X-Spam-Flag2" "YES" { fileinto "Junk2"; stop; }
if address :domain :is "from" "list2.example" { addflag "\\Seen"; fileinto "L2"; }
if header :contains "X-Spam-Flag3" "YES" { fileinto "Junk3"; stop; }
if address :domain :is "from" "list3.example" { addflag "\\Seen"; fileinto "L3"; }
if header :contains "X-Spam-Flag4" "YES" { fileinto "Junk4"; stop; }
if address :domain :is "from" "list4.example" { addflag "\\Seen"; fileinto "L4"; }
if header :contains "X-Spam-Flag5" "YES" { fileinto "Junk5"; stop; }
if address :domain :is "from" "list5.example" { addflag "\\Seen"; fileinto "L5"; }
if header :contains "X-Spam-Flag6" "YES" { fileinto "Junk6"; stop; }
if address :domain :is "from" "list6.example" { addflag "\\Seen"; fileinto "L6"; }
if header :contains "X-Spam-Flag7" "YES" { fileinto "Junk7"; stop; }
if address :domain :is "from" "list7.example" { addflag "\\Seen"; fileinto "L7"; }
if header :contains "X-Spam-Flag8" "YES" { fileinto "Junk8"; stop; }
if address :domain :is "from" "list8.example" { addflag "\\Seen"; fileinto "L8"; }
if header :contains "X-Spam-Flag9" "YES" { fileinto "Junk9"; stop; }
if address :domain :is "from" "list9.example" { addflag "\\Seen"; fileinto "L9"; }
